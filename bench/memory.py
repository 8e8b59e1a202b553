"""One training step's memory and time: loraq (chunked loss, and the plain full-logit loss) against PEFT +
bitsandbytes, with and without gradient checkpointing, side by side in alternating fresh processes.

    .venv/bin/python bench/memory.py                          # QLoRA, batch 8 x 512, r=16 on 7 projections
    .venv/bin/python bench/memory.py --setups loraq-chunked,loraq-plain --rounds 2

The default model, real English (E2E descriptions end to end) with the loss on every token (DESIGN.md §11's
setting). `loraq-chunked-mmap4` is loraq with `--mmap-threshold-mb 4` (glibc returns freed blocks of 4 MiB and
more at once). Per process: the step's tensor peak (the profiler's live CPU tensor bytes during one step, beyond
the model already loaded), the peak RSS of the unprofiled steps (loading included), and their median time. Writes
bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from steps import PROJECTIONS, batch_of_text, memory_events  # noqa: E402

SETUPS = ("loraq-chunked", "loraq-chunked-mmap4", "loraq-plain", "peft-qlora")
MB = 2**20


def load(which: str, rank: int, checkpointing: bool):
    import torch

    import loraq

    if which.startswith("loraq"):
        config = loraq.LoraConfig(r=rank, alpha=2 * rank, targets=PROJECTIONS, method="qlora")
        model, tokenizer = loraq.load_model("smollm2-135m", method=config)
        loraq.apply(model, config)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from loraq.product.models import default_model_dir

        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        folder = default_model_dir()
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=quantized, device_map="cpu"
        )
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, tokenizer


def step_fn(which: str, model, x):
    import torch

    from loraq.product.train import loss_sum

    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}

    def step() -> float:
        if which.startswith("loraq"):
            total, n = loss_sum(model, batch, chunked=which == "loraq-chunked")
            loss = total / n
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return float(loss)

    return step


def measure(which: str, checkpointing: bool, batch: int, seq: int, rank: int, steps: int, trim: bool = False) -> dict:
    import ctypes

    import torch

    from loraq.product.host_memory import set_mmap_threshold

    which, _, mmap = which.partition("-mmap")  # loraq-chunked-mmap4: as `loraq train --mmap-threshold-mb 4`
    if mmap:
        set_mmap_threshold(int(mmap))
    torch.manual_seed(0)
    model, tokenizer = load(which, rank, checkpointing)
    model.train()
    x = batch_of_text(tokenizer, batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step = step_fn(which, model, x)
    times, losses = [], []
    libc = ctypes.CDLL("libc.so.6") if trim else None
    for i in range(1 + steps):  # one warm-up step, then timed ones
        t0 = time.perf_counter()
        losses.append(step())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if libc is not None:  # --malloc-trim: hand glibc's free heap back to the kernel after every step
            libc.malloc_trim(0)
        if i:
            times.append(time.perf_counter() - t0)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the profiler's own memory
    trace = Path(f"/tmp/loraq-bench-memory-{which}-{checkpointing}.json")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    optimizer.zero_grad(set_to_none=True)
    peak = max(total for _, total in memory_events(prof, trace)[1])
    return {
        "which": which + (f"-mmap{mmap}" if mmap else ""),
        "checkpointing": checkpointing,
        "tensor_peak": peak,
        "rss_peak": rss_peak,
        "step_s": statistics.median(times),
        "loss": losses[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--checkpointing", default="on,off", help="on, off, or on,off")
    ap.add_argument("--malloc-trim", action="store_true", help="malloc_trim(0) after every step (glibc)")
    ap.add_argument("--child", nargs=2, metavar=("SETUP", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, ckpt = args.child
        print(json.dumps(measure(which, ckpt == "on", args.batch, args.seq, args.rank, args.steps, args.malloc_trim)))
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for ckpt in args.checkpointing.split(","):
            for which in args.setups.split(","):
                cmd = [sys.executable, str(HERE), "--child", which, ckpt]
                cmd += [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "rank", "steps")]
                cmd += ["--malloc-trim"] if args.malloc_trim else []
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results.setdefault((which, ckpt), []).append(json.loads(out.strip().splitlines()[-1]))
                print(f"  {which} checkpointing {ckpt}: {results[which, ckpt][-1]}", file=sys.stderr, flush=True)

    def med(key: tuple[str, str], field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    lines = [f"batch {args.batch} x {args.seq}, QLoRA r={args.rank} on 7 projections, loss on every token",
             "| checkpointing | setup | tensor peak (MiB) | peak RSS (MiB) | step (s) | loss |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for ckpt in args.checkpointing.split(","):
        for which in args.setups.split(","):
            key = (which, ckpt)
            lines.append(f"| {ckpt} | {which} | {med(key, 'tensor_peak') / MB:,.0f} | {med(key, 'rss_peak') / MB:,.0f} "
                         f"| {med(key, 'step_s'):.2f} | {results[key][0]['loss']:.4f} |")  # fmt: skip
    print("\n".join(lines))
    out = HERE.parent / "results" / ("memory-malloc-trim.json" if args.malloc_trim else "memory.json")
    out.write_text(json.dumps({f"{w}, checkpointing {c}": r for (w, c), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
