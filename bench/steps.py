"""Training step time and peak memory on the default model, loraq vs PEFT (+ bitsandbytes), side by side.

Each measurement runs in its own process (so peak RSS is that setup's alone: loading included), and the
setups alternate for --rounds rounds; the report gives medians and ratios to the first setup.

    .venv/bin/python bench/steps.py                       # loraq-lora vs peft-lora
    .venv/bin/python bench/steps.py --setups loraq-qlora,loraq-lora,peft-lora,peft-qlora
    .venv/bin/python bench/steps.py --setups loraq-lora,loraq-qlora,loraq-qalora,loraq-constants
    .venv/bin/python bench/steps.py --setups loraq-qalora,loraq-qadora,loraq-qlora,loraq-qdora   # DoRA's cost
    .venv/bin/python bench/steps.py --setups loraq-qlora,peft-qlora --compute-dtype bf16  # both in bf16 autocast

`--interleaved` runs the setups in one process instead, one step of each in turn, for --steps rounds: on a
shared, noisy machine the time ratio is then measured over the same seconds (peak RSS is not reported).
`--tensor-peak` adds one profiled step to each process: the step's peak of live tensor bytes, which RSS hides:

    .venv/bin/python bench/steps.py --setups loraq-qalora,loraq-qadora --compute-dtype bf16 --interleaved --steps 12
    .venv/bin/python bench/steps.py --setups loraq-qalora,loraq-qadora --compute-dtype bf16 --interleaved --dropout 0.05
    .venv/bin/python bench/steps.py --setups loraq-qalora,loraq-qadora,peft-dora --compute-dtype bf16 --tensor-peak

Batch 4 x 256 tokens, r=16 on all 7 projections, loss on every token, AdamW on the adapter. With
--compute-dtype bf16 every setup runs under CPU bf16 autocast (bitsandbytes with bf16 compute), as
`loraq train` does on a CPU with native bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def memory_events(profiler, trace) -> tuple[list[dict], list[tuple[float, int]]]:
    """A finished profiler's trace events (written to `trace`, a Path, then removed) and its CPU memory timeline:
    (time, live tensor bytes) at each allocation and free (DESIGN.md §11: the tensor peak, which RSS hides)."""
    profiler.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    cpu = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return events, [(e["ts"], e["args"]["Total Allocated"]) for e in cpu]


def batch_of_text(tokenizer, batch: int, seq: int):
    """(batch, seq) token ids of real English: E2E descriptions packed end to end."""
    import torch

    from loraq.product.data import load_examples

    text = " ".join(ex.response for ex in load_examples("e2e"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: batch * seq]
    return torch.tensor(ids).view(batch, seq)


SETUPS = ("loraq-lora", "loraq-qlora", "loraq-qalora", "loraq-constants", "peft-lora", "peft-qlora",
          "loraq-dora", "loraq-qdora", "loraq-qadora", "peft-dora")  # fmt: skip


def load(which: str, rank: int, dtype, dropout: float = 0.0):
    import torch

    import loraq

    if which.startswith("loraq"):
        # the base is built while loading, as `loraq train` does: NF4 + double quantization, blocksize 64, or
        # the GGUF's own INT4 g32 codes; "constants" trains the groups' scales and offsets alone
        # "-dora" setups add DoRA (loraq-dora, loraq-qdora, loraq-qadora)
        dora = which.endswith("dora")
        plain = which.replace("qadora", "qalora").replace("dora", "lora")
        method = {"loraq-lora": "lora", "loraq-qlora": "qlora"}.get(plain, "qalora")
        options = {"r": 0, "train_constants": "both"} if which == "loraq-constants" else {"r": rank}
        config = loraq.LoraConfig(alpha=2 * rank, targets=PROJECTIONS, method=method, use_dora=dora, dropout=dropout,
                                  **options)  # fmt: skip
        model, tokenizer = loraq.load_model("smollm2-135m", method=config)
        loraq.apply(model, config)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from loraq.product.models import default_model_dir

    folder = default_model_dir()
    kwargs: dict = {"dtype": torch.float32}
    if which == "peft-qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    dora = which == "peft-dora"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS, use_dora=dora, lora_dropout=dropout)
    model = get_peft_model(model, config)
    return model, AutoTokenizer.from_pretrained(folder)


def train_step(model, optimizer, x, dtype) -> float:
    """One AdamW step on the batch `x` (the loss on every token), under CPU autocast unless `dtype` is fp32."""
    import torch

    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def measure(which: str, batch: int, seq: int, rank: int, warmup: int, steps: int, compute_dtype: str,
            dropout: float = 0.0, tensor_peak: bool = False) -> dict:  # fmt: skip
    import torch

    from loraq.quant import workspace

    torch.manual_seed(0)
    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float32
    model, tokenizer = load(which, rank, dtype, dropout)
    model.train()
    x = batch_of_text(tokenizer, batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    with workspace.attached(model):  # (as `loraq train` lends one; PEFT's layers have no use for it)
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, x, dtype)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the profiler's own memory
        peak = None
        if tensor_peak:  # one more step, profiled: its live CPU tensor bytes beyond what was there before it
            trace = Path(f"/tmp/loraq-bench-steps-{which}-{os.getpid()}.json")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as p:
                train_step(model, optimizer, x, dtype)
            peak = max(total for _, total in memory_events(p, trace)[1]) / 2**20
    return {
        "which": which,
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times),
        "peak_rss_mb": rss,
        "tensor_peak_mb": peak,
        "first_loss": losses[0],
    }


def interleaved(setups: list[str], batch: int, seq: int, rank: int, warmup: int, steps: int, compute_dtype: str,
                dropout: float = 0.0):  # fmt: skip
    """Median step time of each setup, the setups loaded in this process and stepping in turn."""
    import torch

    from loraq.quant import workspace

    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float32
    runs = {}
    for which in setups:
        torch.manual_seed(0)
        model, tokenizer = load(which, rank, dtype, dropout)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[which] = (model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))
    x = batch_of_text(tokenizer, batch, seq)
    times: dict[str, list[float]] = {which: [] for which in setups}
    for i in range(warmup + steps):
        for which, (model, optimizer, _) in runs.items():
            with workspace.attached(model):
                t0 = time.perf_counter()
                train_step(model, optimizer, x, dtype)
                if i >= warmup:
                    times[which].append(time.perf_counter() - t0)
    first = statistics.median(times[setups[0]])
    where = f"batch {batch} x {seq}, r={rank}, dropout {dropout}, {compute_dtype}"
    print(f"\n{where}, one process, {steps} interleaved steps after {warmup}")
    for which in setups:
        step = statistics.median(times[which])
        print(f"{which:13s}{runs[which][2]:>12,} trainable  step {step:.3f} s  this/{setups[0]}: {step / first:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--setups", default="loraq-lora,peft-lora", help=f"comma list of {', '.join(SETUPS)}")
    ap.add_argument("--compute-dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (DoRA then also multiplies the base "
                    "by the dropped-out input, as PEFT's training formula does)")  # fmt: skip
    ap.add_argument("--interleaved", action="store_true", help="one process, the setups' steps in turn")
    ap.add_argument("--tensor-peak", action="store_true", help="one more step per process under the profiler: "
                    "the step's peak of live tensor bytes (DESIGN.md §11), beside the peak RSS")  # fmt: skip
    ap.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        options = (args.batch, args.seq, args.rank, args.warmup, args.steps, args.compute_dtype, args.dropout)
        print(json.dumps(measure(args.child, *options, tensor_peak=args.tensor_peak)))
        return

    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        ap.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    if args.interleaved:
        interleaved(setups, args.batch, args.seq, args.rank, args.warmup, args.steps, args.compute_dtype, args.dropout)
        return
    results: dict[str, list[dict]] = {s: [] for s in setups}
    for _ in range(args.rounds):
        for which in setups:
            cmd = (
                [sys.executable, __file__, "--child", which]
                + [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "rank", "warmup", "steps", "dropout")]
                + [f"--compute-dtype={args.compute_dtype}"]
                + (["--tensor-peak"] if args.tensor_peak else [])
            )
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[which].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {which:12s} {results[which][-1]}", file=sys.stderr)

    def med(which: str, key: str) -> float:
        return statistics.median(r[key] for r in results[which])

    print(
        f"\nbatch {args.batch} x {args.seq}, r={args.rank} on {len(PROJECTIONS)} projections, {args.compute_dtype}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, {args.rounds} alternating rounds"
    )
    first = setups[0]
    print(f"{'':13s}{'trainable':>12s}{'step (s)':>10s}{'peak RSS (MB)':>15s}{'loss@1':>8s}  ratios to {first}")
    for which in setups:
        r = results[which][0]
        step_ratio = med(first, "step_s") / med(which, "step_s")
        rss_ratio = med(first, "peak_rss_mb") / med(which, "peak_rss_mb")
        print(
            f"{which:13s}{r['trainable']:>12,}{med(which, 'step_s'):>10.2f}{med(which, 'peak_rss_mb'):>15.0f}"
            f"{r['first_loss']:>8.3f}  {first}/this: step {step_ratio:.3f}, RSS {rss_ratio:.3f}"
        )
    if args.tensor_peak:
        print(f"\nthe step's tensor peak (MiB, profiler; median of {args.rounds} processes), ratio to {first}")
        for which in setups:
            peak = med(which, "tensor_peak_mb")
            print(f"{which:13s}{peak:>10.0f}  {peak / med(first, 'tensor_peak_mb'):.3f}")


if __name__ == "__main__":
    main()
