"""A 7B model fine-tuned on this machine (no GPU): loraq QLoRA and QA-LoRA beside PEFT + bitsandbytes, each in a
fresh process, on the same files and the same step shape (one row of 512 tokens, gradient checkpointing).

    .venv/bin/python bench/big_model.py                              # every setup, 2 steps each
    .venv/bin/python bench/big_model.py --setups loraq-qlora-mmap4,peft-qlora --steps 2

The model is written once (to ~/.cache/loraq/bench/llama2-7b-random, 13.5 GB): Llama-2-7B's shapes with random
bf16 weights (std 0.02), sharded safetensors of ~2 GB, and the default model's tokenizer (vocabulary 49152, so
the embedding and head are 49152 x 4096). Random weights train exactly as fast and as large as real ones.

loraq runs through `loraq train` (the real command) on plain-text records of E2E descriptions cut at 512 tokens,
the loss on every token, a one-record validation file so that evaluation costs seconds; `-mmapN` setups add
`--mmap-threshold-mb N`; `-nocache` setups `--base-cache off` (otherwise the first loraq run of a method writes its
quantized base to $LORAQ_CACHE/bases and every later one maps it: run a setup twice to see both). Its run
summary gives peak RSS, the process's own (anonymous) memory apart from mapped file pages, and load time;
metrics.jsonl the step times. PEFT + bitsandbytes loads the same folder with NF4 +
double quantization and fp32 compute (loraq's CPU numerics), r=16 on all 7 projections, and takes AdamW steps on
the first record's 512 tokens; its memory is sampled the same way (host_memory.py). `loraq plan` is asked for
the same run and set beside the measured peak. Writes bench/results/big_model.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
SETUPS = ("loraq-qlora", "loraq-qlora-mmap4", "loraq-qalora-mmap4", "peft-qlora")
SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 2 * 10**9
MB = 2**20


def model_folder() -> Path:
    from loraq.product.fetch import cache_dir

    return cache_dir() / "bench" / "llama2-7b-random"


def write_model(folder: Path) -> None:
    """The random 7B model as sharded bf16 safetensors + config + the default model's tokenizer, written once."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraq.atomic import atomic_folder
    from loraq.product.models import default_model_dir

    if (folder / "model.safetensors.index.json").is_file():
        return
    config = LlamaConfig(**SHAPES)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    shards, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    print(f"writing a random 7B model ({sum(math.prod(s) for s in shapes.values()) / 1e9:.2f} B parameters, "
          f"{len(shards)} shards) to {folder}", flush=True)  # fmt: skip
    start, g = time.perf_counter(), torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    with atomic_folder(folder) as tmp:
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key in keys:
                if key.endswith("norm.weight"):
                    tensors[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
                else:
                    tensors[key] = torch.empty(shapes[key], dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
                weight_map[key] = name
                total += tensors[key].numel() * 2
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            print(f"  {name} ({time.perf_counter() - start:.0f} s)", flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        config.torch_dtype = "bfloat16"
        config.save_pretrained(tmp)
        source = default_model_dir()
        for f in source.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy(f, tmp / f.name)


def write_data(work: Path) -> tuple[Path, Path]:
    """Plain-text records of ~700 tokens each (E2E descriptions end to end): with --max-length 512 every step
    is one row of exactly 512 tokens with the loss on every token. The validation file holds one record."""
    from loraq.product.data import load_examples

    text = " ".join(ex.response for ex in load_examples("e2e"))
    records = [json.dumps({"text": text[i : i + 3000]}) for i in range(0, 3000 * 9, 3000)]
    (work / "train.jsonl").write_text("\n".join(records[:8]) + "\n")
    (work / "val.jsonl").write_text(records[8] + "\n")
    return work / "train.jsonl", work / "val.jsonl"


def run_loraq(
    method: str, folder: Path, steps: int, work: Path, data: tuple[Path, Path], mmap_mb: int, dtype: str, cache: str
) -> dict:
    out = work / f"run-{method}"
    train, val = data
    cmd = [str(ROOT / ".venv/bin/loraq"), "train", "--model", str(folder), "--method", method, "--steps", str(steps),
           "--data", str(train), "--val-data", str(val), "--batch-size", "1", "--max-length", "512",
           "--grad-checkpoint", "--warmup-steps", "1", "--rank", "16", "--mmap-threshold-mb", str(mmap_mb),
           "--compute-dtype", dtype, "--base-cache", cache, "--out", str(out), "--overwrite"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:], "returncode": done.returncode}
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_s = [r["tokens"] / r["tok_s"] for r in records if "tok_s" in r]
    return {
        "seconds_per_step": steps_s,
        "tokens_per_step": [r["tokens"] for r in records if "tokens" in r],
        "load_s": summary.get("load_seconds"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "peak_anonymous_mb": summary.get("peak_anonymous_mb"),
        "peak_files_mb": summary.get("peak_files_mb"),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def peft_worker(folder: Path, steps: int, dtype: str) -> dict:
    """PEFT + bitsandbytes on the same files: NF4, double quantization, fp32 compute (or bf16: the model's other
    weights loaded in bf16 and bitsandbytes computing in bf16, as its users run it), r=16 on 7 projections."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraq.product.host_memory import HostMemory

    with HostMemory() as host:
        start = time.perf_counter()
        compute = torch.bfloat16 if dtype == "bf16" else torch.float32
        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=compute)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=compute, quantization_config=quantized, device_map="cpu"
        )
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        load_s = time.perf_counter() - start
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        from transformers import AutoTokenizer

        text = json.loads((folder.parent / "runs" / "train.jsonl").read_text().splitlines()[0])["text"]
        x = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"][:, :512]
        model.train()
        seconds = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t0)
    return {
        "seconds_per_step": seconds,
        "tokens_per_step": [x.shape[1] - 1] * steps,
        "load_s": round(load_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_anonymous_mb": round((host.peak("anonymous") or 0) / MB, 1),
        "peak_files_mb": round((host.peak("files") or 0) / MB, 1),
    }


def run_peft(folder: Path, steps: int, dtype: str) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--folder", str(folder), "--steps", str(steps), "--dtype", dtype]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-2000:], "returncode": done.returncode}
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - started, 1)}


def plan_for(method: str, folder: Path, seq: int, dtype: str) -> int:
    from loraq.product.plan import plan_memory

    compute_bytes = 2 if dtype == "bf16" else 4
    return plan_memory(
        str(folder), method, batch_size=1, seq_len=seq, rank=16, grad_checkpoint=True, compute_bytes=compute_bytes
    ).peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench/results/big_model.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(peft_worker(Path(args.folder), args.steps, args.dtype)), flush=True)
        return
    folder = model_folder()
    write_model(folder)
    work = folder.parent / "runs"
    work.mkdir(exist_ok=True)
    data = write_data(work)  # (the PEFT worker reads the first training record too)
    results = {"cores": os.cpu_count(), "steps": args.steps, "setups": {}}
    for setup in args.setups.split(","):
        print(f"{setup} ...", flush=True)
        name, bf16, _ = setup.replace("-nocache", "").partition("-bf16")  # ...-bf16: bf16 compute (autocast)
        dtype = "bf16" if bf16 else "fp32"
        if name.startswith("loraq-"):  # loraq-METHOD[-mmapN][-nocache]: --mmap-threshold-mb N, --base-cache off
            cache = "off" if "-nocache" in setup else "auto"
            method, _, mmap = name.removeprefix("loraq-").partition("-mmap")
            result = run_loraq(method, folder, args.steps, work, data, int(mmap or 0), dtype, cache)
            result["plan_mb"] = round(plan_for(method, folder, 512, dtype) / MB)
        else:
            result = run_peft(folder, args.steps, dtype)
        results["setups"][setup] = result
        print(f"  {json.dumps(result)}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("\n| setup | s/step | tokens/s | load s | peak anonymous MiB | peak RSS MiB | plan MiB |")
    print("|---|---|---|---|---|---|---|")
    for setup, r in results["setups"].items():
        if "error" in r:
            print(f"| {setup} | failed: {r['error'].strip().splitlines()[-1][:80]} |")
            continue
        step = sum(r["seconds_per_step"]) / len(r["seconds_per_step"])
        tok = sum(r["tokens_per_step"]) / sum(r["seconds_per_step"])
        print(f"| {setup} | {step:.1f} | {tok:.2f} | {r['load_s']} | {r['peak_anonymous_mb']:,.0f} | "
              f"{r['peak_rss_mb']:,.0f} | {r.get('plan_mb', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()
