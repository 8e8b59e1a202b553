"""The prepared GPU check: one run on one GPU, no downloads, under 5 minutes; prints one table.

    python bench/gpu.py --tests      # the CUDA tests (compiled Triton kernels), then the bench
    python bench/gpu.py --dry-run    # on a CPU: tiny shapes through every code path; no figures

A 1.1 B-parameter Llama built from a config with random weights (hidden 2048, 16 layers, FFN 8192, 32 heads /
8 KV heads, vocab 32000), batch 8 x 512 tokens, LoRA r=16 alpha=32 on the 7 projections, bf16 autocast, AdamW
on the adapters, median of 8 steps after 3: step time, tokens/s, resident memory (model + optimizer before the
first step) and peak memory for PEFT LoRA (bf16 base), PEFT + bitsandbytes QLoRA (NF4+DQ, bf16 compute), loraq
LoRA, QLoRA and QA-LoRA INT4 g32. Then one frozen 14336 x 4096 layer: forward on 4096 tokens, forward+backward
(input gradient), one token, for a bf16 nn.Linear, bitsandbytes' Linear4bit and loraq's NF4 and INT4 layers;
and the dequantization of that weight to bf16 against the memory-bandwidth floor. peft and bitsandbytes are
bench-only dependencies (the setups that need them are skipped without them).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BANDWIDTH = 4.3e12  # bytes/s, H200 HBM3e: the floor for a dequantize reads 0.5 and writes 2 bytes a weight
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=32000)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)  # fmt: skip


def timed(fn, device, warmup: int, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory(device) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def build_folder(shape: dict, folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}  # loraq loads a model with its tokenizer
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", eos_token="t1").save_pretrained(folder)


def setup_model(name: str, folder: Path, device, dtype):
    """(model, trainable parameters) for one setup, on the device."""
    import loraq

    if name.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kwargs = {"dtype": dtype}
        if name == "peft-qlora":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )  # fmt: skip
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
    else:
        from loraq.product.base import build_base
        from loraq.product.train import frozen_to

        method = {"loraq-lora": "lora", "loraq-qlora": "qlora", "loraq-qalora": "qalora"}[name]
        config = loraq.LoraConfig(r=16, alpha=32, targets=PROJECTIONS, method=method)
        model, _, _ = build_base(str(folder), config, device=device)  # quantized on the device, layer by layer
        model.to(device)
        frozen_to(model, dtype)
        loraq.apply(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def bench_steps(names, folder, device, dtype, batch, seq, vocab, warmup, repeat) -> list[dict]:
    rows = []
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    for name in names:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            rows.append(measure_steps(name, folder, device, dtype, ids, warmup, repeat))
        except ImportError as e:
            print(f"  {name}: skipped ({e})", flush=True)
    return rows


def measure_steps(name, folder, device, dtype, ids, warmup, repeat) -> dict:
    from loraq.quant.workspace import attached

    model, params = setup_model(name, folder, device, dtype)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    resident = memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with attached(model):
        seconds = timed(step, device, warmup, repeat)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"  {name}: {seconds * 1e3:.1f} ms/step", flush=True)
    tokens = ids.numel()
    return {"setup": name, "step_ms": seconds * 1e3, "tok_s": tokens / seconds, "resident": resident, "peak": peak}


def bench_layer(shape, tokens, device, dtype, warmup, repeat) -> list[dict]:
    """One frozen layer: forward on `tokens` rows, forward+backward, one row; dequantize GB/s."""
    from loraq.quant.frozen import cuda_kernels
    from loraq.quant.schemes import scheme_named
    from loraq.quant.workspace import Workspace

    out_f, in_f = shape
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f, device=device) * 0.02
    layers = {"bf16 nn.Linear": torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)}
    layers["bf16 nn.Linear"].weight.data.copy_(weight)
    layers["bf16 nn.Linear"].requires_grad_(False)
    try:
        import bitsandbytes as bnb

        if device.type == "cuda":
            linear4 = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4",
                                        compress_statistics=True)  # fmt: skip
            linear4.weight = bnb.nn.Params4bit(weight.to(dtype).cpu(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=True)  # fmt: skip
            layers["bitsandbytes NF4"] = linear4.to(device)
    except ImportError:
        pass
    workspace = Workspace()
    for label, scheme in (("loraq NF4", "nf4"), ("loraq INT4 g32", "int4")):
        layer = scheme_named(scheme).quantize_layer("bench", weight, None)
        layer.workspace = workspace
        layers[label] = layer
    rows = []
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    one = torch.randn(1, 1, in_f, device=device, dtype=dtype)
    for label, layer in layers.items():
        xg = x.clone().requires_grad_(True)

        def fwd_bwd(layer=layer, xg=xg):
            layer(xg).sum().backward()

        with torch.no_grad():
            forward = timed(lambda layer=layer: layer(x), device, warmup, repeat)
            single = timed(lambda layer=layer: layer(one), device, warmup, repeat)
        rows.append({"layer": label, "forward_ms": forward * 1e3, "fwd_bwd_ms": timed(fwd_bwd, device, warmup,
                     repeat) * 1e3, "one_token_ms": single * 1e3})  # fmt: skip
    gbs = {}
    kernels = cuda_kernels() if device.type == "cuda" else None
    for label in ("loraq NF4", "loraq INT4 g32"):
        layer = layers[label]
        seconds = timed(lambda layer=layer: layer.dequantize(dtype, workspace), device, warmup, repeat)
        gbs[label] = seconds
    if "bitsandbytes NF4" in layers:
        import bitsandbytes.functional as bf

        w = layers["bitsandbytes NF4"].weight
        gbs["bitsandbytes NF4"] = timed(lambda: bf.dequantize_4bit(w.data, w.quant_state), device, warmup, repeat)
    floor = out_f * in_f * 2.5 / BANDWIDTH
    for r in rows:
        if r["layer"] in gbs:
            r["dequant_ms"] = gbs[r["layer"]] * 1e3
            r["of_floor"] = floor / gbs[r["layer"]]
    print(f"  kernels: {'Triton' if kernels else 'PyTorch path'}; bandwidth floor {floor * 1e3:.3f} ms", flush=True)
    return rows


def report(steps: list[dict], layers: list[dict], dry: bool) -> None:
    by = {r["setup"]: r for r in steps}
    print("\n| setup | step (ms) | tokens/s | resident (GiB) | peak (GiB) |\n|---|---|---|---|---|")
    for r in steps:
        print(f"| {r['setup']} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | {r['resident']:.2f} | {r['peak']:.2f} |")
    print("\n| layer | forward (ms) | fwd+bwd (ms) | one token (ms) | dequantize (ms) | of bandwidth floor |")
    print("|---|---|---|---|---|---|")
    for r in layers:
        dq = f"{r['dequant_ms']:.3f} | {r['of_floor']:.0%}" if "dequant_ms" in r else "| "
        print(f"| {r['layer']} | {r['forward_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['one_token_ms']:.4f} | {dq} |")
    if dry:
        print("\n(dry run on tiny shapes: the figures mean nothing; every code path ran)")
        return
    goals = []
    lay = {r["layer"]: r for r in layers}

    def ratio(a, b, key):
        return a[key] / b[key] if a and b else float("nan")

    peft, bnb, lora, qlora, qalora = (by.get(k) for k in ("peft-lora", "peft-qlora", "loraq-lora", "loraq-qlora",
                                                           "loraq-qalora"))  # fmt: skip
    goals.append(("loraq QLoRA step / PEFT bf16 LoRA step", ratio(qlora, peft, "step_ms"), "<= 1.10"))
    goals.append(("loraq QLoRA step / PEFT + bnb QLoRA step", ratio(qlora, bnb, "step_ms"), "<= 0.93 (stretch 0.85)"))
    goals.append(("loraq QA-LoRA INT4 step / PEFT bf16 LoRA step", ratio(qalora, peft, "step_ms"), "<= 1.10"))
    goals.append(("loraq LoRA step / PEFT LoRA step", ratio(lora, peft, "step_ms"), "<= 1.0"))
    goals.append(("loraq LoRA resident / PEFT LoRA resident", ratio(lora, peft, "resident"), "<= 1.0"))
    goals.append(("loraq QLoRA peak / PEFT + bnb peak", ratio(qlora, bnb, "peak"), "<= 1.0"))
    goals.append(("one token, loraq NF4 / bitsandbytes", ratio(lay.get("loraq NF4"), lay.get("bitsandbytes NF4"),
                  "one_token_ms"), "<= 1.0"))  # fmt: skip
    goals.append(("dequantize, loraq NF4, share of the floor's speed", lay.get("loraq NF4", {}).get("of_floor",
                  float("nan")), ">= 0.5"))  # fmt: skip
    print("\n| goal | measured | target |\n|---|---|---|")
    for what, value, target in goals:
        print(f"| {what} | {value:.2f} | {target} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever device there is")
    ap.add_argument("--tests", action="store_true", help="run the CUDA tests first (compiled kernels)")
    ap.add_argument("--setups", default="peft-lora,peft-qlora,loraq-lora,loraq-qlora,loraq-qalora")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run to check the script on a CPU")
        return 1
    if args.tests:
        env = {"TRITON_INTERPRET": "0"} if cuda else {}
        files = ["tests/test_kernels.py", "tests/test_schemes.py", "tests/test_device.py"]
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                               env={**__import__("os").environ, **env})  # fmt: skip
        print(f"CUDA tests: {'passed' if code == 0 else 'FAILED'}", flush=True)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape, batch, seq, layer, tokens, warm, rep = (
        (TINY, 2, 16, (256, 128), 64, 1, 2) if args.dry_run else (BIG, 8, 512, (14336, 4096), 4096, 3, 8)
    )
    if cuda:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        build_folder(shape, folder)
        names = [n for n in args.setups.split(",") if cuda or not n.startswith("peft-qlora")]
        steps = bench_steps(names, folder, device, dtype, batch, seq, shape["vocab_size"], warm, rep)
    layers = bench_layer(layer, tokens, device, dtype, warm, 20 if not args.dry_run else 2)
    report(steps, layers, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
