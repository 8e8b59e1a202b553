"""Training throughput with and without packing on the demo data (default model, E2E, batch 8, max length 256),
side by side in one run: real (non-padding) tokens per second, and the ratio.

    .venv/bin/python bench/packing.py [--steps 8]

Packed sequences hold several examples (position ids restart per example, so none attends to another), so a
batch carries ~4x the tokens of an unpacked batch of short E2E examples for a modest increase in step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def run(packing: bool, steps: int, folder: Path) -> float:
    import loraq

    out = folder / ("packed" if packing else "plain")
    cfg = loraq.TrainConfig(steps=steps, batch_size=8, max_length=256, lr=1e-3, warmup_steps=1, eval_every=0,
                            save_every=0, packing=packing, out=str(out))  # fmt: skip
    loraq.train(cfg, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tok_s"] for r in records if "tok_s" in r and r["step"] > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain = run(False, args.steps, Path(tmp))
        packed = run(True, args.steps, Path(tmp))
    print(f"tokens/s (median of steps 2..{args.steps}): without packing {plain:.0f}, with packing {packed:.0f}; "
          f"ratio {packed / plain:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
