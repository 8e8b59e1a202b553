"""The bad-input suite: every user-facing entry point fed what a careless user or a hostile file produces.

Each case must end in exactly one `loraq: error: ...` line naming the problem (exit status 2, no traceback)
and leave no output behind. docs/reliability.md lists the cases; its rows are the ids below.
"""

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import E2E_TINY, FIXTURES, build_tiny_model
from safetensors.torch import save_file

import loraq
from loraq.product.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Files the cases point at: a trained tiny run, its adapter, and broken variants."""
    root = tmp_path_factory.mktemp("bad")
    cfg = loraq.TrainConfig(model=str(tiny_model_dir), data=str(E2E_TINY), steps=2, batch_size=4, rank=4,
                            eval_every=0, out=str(root / "run"))  # fmt: skip
    loraq.train(cfg, progress=False)
    qa = loraq.TrainConfig(model=str(tiny_model_dir), data=str(E2E_TINY), steps=2, batch_size=4, rank=4,
                           eval_every=0, method="qalora", train_constants="both", out=str(root / "qa-run"))  # fmt: skip
    loraq.train(qa, progress=False)
    model, tokenizer = loraq.load_model(tiny_model_dir, method=loraq.LoraConfig(method="qalora", group_size=64))
    loraq.save_quantized(model, tokenizer, root / "int4-g64")
    return root


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def lying_safetensors(path: Path) -> None:
    """A safetensors file whose header claims a tensor ends far beyond the file."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'PWNED'}",))


def case_files(world: Path, tmp: Path, tiny_model_dir: Path) -> dict[str, tuple[list[str], str]]:
    """id -> (argv, expected fragment of the error)."""
    run, adapter = world / "run", world / "run" / "adapter"

    def data(name: str, text: bytes) -> str:
        (tmp / name).write_bytes(text)
        return str(tmp / name)

    train = ["train", "--model", str(tiny_model_dir), "--steps", "1", "--batch-size", "2", "--out", str(tmp / "out")]

    other = build_tiny_model(vocab_size=400)
    other.config.hidden_size = 64
    wide = tmp / "other-model"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**other.config.to_dict(), "hidden_size": 96, "num_attention_heads": 4,
                                    "head_dim": 24})).save_pretrained(wide)  # fmt: skip
    for f in tiny_model_dir.iterdir():
        if "token" in f.name:
            (wide / f.name).write_bytes(f.read_bytes())

    nan_adapter = copy_dir(adapter, tmp / "nan-adapter")
    tensors = loraq.formats.peft.read_adapter_tensors(nan_adapter)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(nan_adapter / "adapter_model.safetensors"), metadata={"format": "pt"})

    truncated_adapter = copy_dir(adapter, tmp / "truncated-adapter")
    weights = truncated_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])

    lying_adapter = copy_dir(adapter, tmp / "lying-adapter")
    lying_safetensors(lying_adapter / "adapter_model.safetensors")

    pickled = copy_dir(adapter, tmp / "pickle-adapter")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))

    truncated_model = copy_dir(tiny_model_dir, tmp / "truncated-model")
    w = truncated_model / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    lying_model = copy_dir(tiny_model_dir, tmp / "lying-model")
    lying_safetensors(lying_model / "model.safetensors")

    (tmp / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    yaml_types = data("types.yaml", b"steps: [1, 2]\nlr: fast\n")
    yaml_typo = data("typo.yaml", b"learning_rate: 0.1\n")
    gen = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--adapter"]
    return {
        "data: malformed JSON line": (train + ["--data", data("a.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt"\n')], "a.jsonl:2: not valid JSON"),
        "data: not UTF-8": (train + ["--data", data("b.jsonl", b'{"prompt": "caf\xe9", "completion": "x"}\n')], "b.jsonl: not UTF-8"),
        "data: empty file": (train + ["--data", data("c.jsonl", b"")], "c.jsonl holds no examples"),
        "data: only blank lines": (train + ["--data", data("d.jsonl", b"\n\n  \n")], "d.jsonl holds no examples"),
        "data: wrong fields": (train + ["--data", data("e.jsonl", b'{"question": "a", "answer": "b"}\n')], "e.jsonl:1: cannot tell the format"),
        "data: field of the wrong type": (train + ["--data", data("f.jsonl", b'{"prompt": "a", "completion": 5}\n')], "field 'completion' must be a string"),
        "data: huge prompt only": (train + ["--data", data("g.jsonl", json.dumps({"prompt": "word " * 200_000, "completion": "x"}).encode() + b"\n"), "--max-length", "64"], "no training example fits --max-length 64"),
        "data: unknown suffix": (train + ["--data", data("h.xml", b"<a/>")], "must be .jsonl, .json, .csv, .parquet or .txt"),
        "data: missing file": (train + ["--data", str(tmp / "nope.jsonl")], "nope.jsonl does not exist"),
        "option: unknown target module": (train + ["--data", str(E2E_TINY), "--targets", "q_prj"], "did you mean 'q_proj'"),
        "option: impossible values": (train + ["--data", str(E2E_TINY), "--rank", "0", "--lr", "-1"], "--rank"),
        "option: bits outside 2,3,4,8": (train + ["--data", str(E2E_TINY), "--method", "qalora", "--bits", "5"], r"bits \(--bits\) must be one of 2, 3, 4, 8"),
        "option: group size that does not divide": (train + ["--data", str(E2E_TINY), "--method", "qalora", "--group-size", "256"], "group size 256 does not divide"),
        "option: bf16 on a CPU without it / fp16 on CPU": (train + ["--data", str(E2E_TINY), "--device", "cpu", "--compute-dtype", "fp16"], "fp16 needs CUDA"),
        "option: --cpu-offload without torchrun": (train + ["--data", str(E2E_TINY), "--cpu-offload"], "--cpu-offload keeps the shards of several processes"),
        "plan: a batch the processes cannot split": (["plan", "--model", str(tiny_model_dir), "--world-size", "3", "--batch-size", "8"], "--batch-size 8 does not split over 3 processes"),
        "plan: offload without processes": (["plan", "--model", str(tiny_model_dir), "--cpu-offload"], "--cpu-offload offloads the shards of several processes"),
        "config: wrong types": (["train", "--config", yaml_types], "--steps must be a positive integer"),
        "config: unknown key": (["train", "--config", yaml_typo], "unknown option 'learning_rate'"),
        "model: truncated safetensors": (["generate", "--model", str(truncated_model), "--prompt", "hi"], "could not load model"),
        "model: header lies about offsets": (["generate", "--model", str(lying_model), "--prompt", "hi"], "could not load model"),
        "model: corrupt GGUF": (["generate", "--model", str(tmp / "bad.gguf"), "--prompt", "hi"], "bad.gguf"),
        "model: missing folder": (["generate", "--model", str(tmp / "missing"), "--prompt", "hi"], "no such model folder"),
        "adapter: for another model": (["generate", "--model", str(wide), "--prompt", "hi", "--adapter", str(adapter)], "was this adapter trained on another model|but this model needs"),
        "adapter: NaN weights": (gen + [str(nan_adapter)], "non-finite"),
        "adapter: truncated safetensors": (gen + [str(truncated_adapter)], "not a readable safetensors file"),
        "adapter: header lies about offsets": (gen + [str(lying_adapter)], "not a readable safetensors file"),
        "adapter: legacy pickle, refused": (gen + [str(pickled)], "pickle file, which can run arbitrary code"),
        "adapter: crafted pickle with --allow-pickle": (gen + [str(pickled), "--allow-pickle"], "refused by the tensors-only unpickler"),
        "merge: not a run": (["merge", str(tmp), "--out", str(tmp / "m")], "neither a run folder"),
        "merge: gguf from a non-GGUF model": (["merge", str(run), "--out", str(tmp / "m.gguf"), "--format", "gguf"], "was not loaded from a GGUF"),
        "merge: unknown format": (["merge", str(run), "--out", str(tmp / "m"), "--format", "onnx"], "--format must be one of"),
        "resume: nothing to resume": (train + ["--data", str(E2E_TINY), "--resume"], "holds no run to resume"),
        "resume: changed options": (["train", "--model", str(tiny_model_dir), "--data", str(E2E_TINY), "--steps", "2", "--batch-size", "4", "--rank", "8", "--eval-every", "0", "--out", str(run), "--resume"], "the options differ"),
        "run folder: finished run without --overwrite": (["train", "--model", str(tiny_model_dir), "--data", str(E2E_TINY), "--out", str(run)], "already holds a finished run"),
        "eval: nothing to measure": (["eval", str(tiny_model_dir)], "nothing to measure"),
        "eval: missing text file": (["eval", str(tiny_model_dir), "--text", str(tmp / "none.txt")], "none.txt does not exist"),
        "plan: unknown method": (["plan", "--model", str(tiny_model_dir), "--method", "dora"], "--method must be"),
        "option: group constants without qalora": (train + ["--data", str(E2E_TINY), "--train-constants", "both"], r"--train-constants both\) .* needs --method qalora, not lora"),
        "option: rank 0 without group constants": (train + ["--data", str(E2E_TINY), "--method", "qalora", "--rank", "0"], r"0 only with --train-constants"),
        "option: unknown pooling": (train + ["--data", str(E2E_TINY), "--method", "qalora", "--pooling", "max"], "must be sum or mean"),
        "option: another method's quantizer": (train + ["--data", str(E2E_TINY), "--method", "qlora", "--quantizer", "gptq"], "for method qlora must be auto or nf4 or fp4"),
        "merge: group constants into GPTQ": (["merge", str(world / "qa-run"), "--out", str(tmp / "g"), "--format", "gptq"], r"--format gptq cannot hold .*\(--train-constants both\)"),
        "merge: pooling window that is not the base's groups": (["merge", str(world / "qa-run"), "--out", str(tmp / "p"), "--model", str(world / "int4-g64")], "pools groups of 32 columns, but layer .* groups of 64"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def cases(world, tmp_path_factory, tiny_model_dir):
    return case_files(world, tmp_path_factory.mktemp("cases"), tiny_model_dir)


CASE_IDS = [
    "data: malformed JSON line", "data: not UTF-8", "data: empty file", "data: only blank lines", "data: wrong fields",
    "data: field of the wrong type", "data: huge prompt only", "data: unknown suffix", "data: missing file",
    "option: unknown target module", "option: impossible values", "option: bits outside 2,3,4,8",
    "option: group size that does not divide", "option: bf16 on a CPU without it / fp16 on CPU",
    "option: --cpu-offload without torchrun", "plan: a batch the processes cannot split",
    "plan: offload without processes", "config: wrong types",
    "config: unknown key", "model: truncated safetensors", "model: header lies about offsets", "model: corrupt GGUF",
    "model: missing folder", "adapter: for another model", "adapter: NaN weights", "adapter: truncated safetensors",
    "adapter: header lies about offsets", "adapter: legacy pickle, refused", "adapter: crafted pickle with --allow-pickle",
    "merge: not a run", "merge: gguf from a non-GGUF model", "merge: unknown format", "resume: nothing to resume",
    "resume: changed options", "run folder: finished run without --overwrite", "eval: nothing to measure",
    "eval: missing text file", "plan: unknown method", "option: group constants without qalora",
    "option: rank 0 without group constants", "option: unknown pooling", "option: another method's quantizer",
    "merge: group constants into GPTQ", "merge: pooling window that is not the base's groups",
]  # fmt: skip


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_ends_in_one_clear_error(case, cases, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected = cases[case]
    outputs = [Path(a) for i, a in enumerate(argv) if i and argv[i - 1] == "--out"]
    before = {p: p.exists() for p in outputs}
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("loraq: error:")]
    assert len(lines) == 1, err
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in err
    for path, existed in before.items():
        assert path.exists() == existed, f"{path} was left behind"
    assert not (tmp_path / "PWNED").exists()  # the crafted pickle never ran
    assert not (Path.cwd() / "PWNED").exists()


def test_the_process_exits_2_without_a_traceback(cases, tmp_path):
    argv, _ = cases["adapter: header lies about offsets"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "loraq", *argv], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "loraq: error:" in done.stderr


def test_suite_covers_every_case(cases):
    assert set(CASE_IDS) == set(cases)
    assert FIXTURES.is_dir()
