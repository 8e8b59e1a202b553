"""loraq LoRA vs PEFT LoRA on the default model: step time and peak memory, side by side in one run.

Each measurement runs in its own process (so peak RSS is that implementation's alone), and the two
alternate for --rounds rounds; the report gives medians and the loraq/PEFT ratio.

    .venv/bin/python bench/lora_vs_peft.py            # batch 4 x 256, r=16 on all 7 projections
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch_of_text(tokenizer, batch: int, seq: int):
    """(batch, seq) token ids of real English: E2E descriptions packed end to end."""
    import torch

    from loraq.data import load_examples

    text = " ".join(ex.response for ex in load_examples("e2e"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: batch * seq]
    return torch.tensor(ids).view(batch, seq)


def measure(which: str, batch: int, seq: int, rank: int, warmup: int, steps: int) -> dict:
    import torch

    import loraq

    torch.manual_seed(0)
    model, tokenizer = loraq.load_model("smollm2-135m")
    if which == "loraq":
        loraq.apply(model, loraq.LoraConfig(r=rank, alpha=2 * rank, targets=PROJECTIONS))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS))
    model.train()
    x = batch_of_text(tokenizer, batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {
        "which": which,
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["loraq", "peft"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.seq, args.rank, args.warmup, args.steps)))
        return

    results: dict[str, list[dict]] = {"loraq": [], "peft": []}
    for _ in range(args.rounds):
        for which in ("loraq", "peft"):
            cmd = [sys.executable, __file__, "--child", which] + [
                f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "rank", "warmup", "steps")
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[which].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {which:5s} {results[which][-1]}", file=sys.stderr)

    def med(which: str, key: str) -> float:
        return statistics.median(r[key] for r in results[which])

    print(
        f"\nbatch {args.batch} x {args.seq}, r={args.rank} on {len(PROJECTIONS)} projections, "
        f"median of {args.steps} steps after {args.warmup} warm-up, {args.rounds} alternating rounds"
    )
    print(f"{'':8s}{'trainable':>12s}{'step (s)':>10s}{'peak RSS (MB)':>15s}{'loss@1':>8s}")
    for which in ("loraq", "peft"):
        r = results[which][0]
        print(
            f"{which:8s}{r['trainable']:>12,}{med(which, 'step_s'):>10.2f}{med(which, 'peak_rss_mb'):>15.0f}"
            f"{r['first_loss']:>8.3f}"
        )
    print(
        f"ratio loraq/PEFT: step time {med('loraq', 'step_s') / med('peft', 'step_s'):.3f}, "
        f"peak RSS {med('loraq', 'peak_rss_mb') / med('peft', 'peak_rss_mb'):.3f}"
    )


if __name__ == "__main__":
    main()
