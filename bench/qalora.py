"""LoRA vs QLoRA vs QA-LoRA on the default model and data, scored as *deployed* (same data, steps and seed):
what each ships as, how good that shipped model is, how many parameters it trains, how fast a step is.

    .venv/bin/python bench/qalora.py                     # every setup once, at its default learning rate
    .venv/bin/python bench/qalora.py --sweep             # learning rates at 4 bits, then the combinations
                                                         # and 3 and 2 bits at the best rates (~5 h, 2 cores)
    .venv/bin/python bench/qalora.py --setups qalora,constants --bits 3 --lrs 1e-3,3e-3
    .venv/bin/python bench/qalora.py --setups lora,dora,qalora,qadora --seeds 0,1,2   # DoRA, three seeds
    .venv/bin/python bench/qalora.py --setups qlora,qalora --compute-dtype bf16          # bf16 autocast on a CPU

Setups (all r=16 alpha=2r dropout 0.05 on the 7 projections (--rank to change), AdamW, warmup 10 then cosine,
batch 8, clip 1.0):
  lora               LoRA, merged to 16-bit
  qlora              QLoRA, merged to 16-bit, and merged then re-quantized to INT-k g32 RTN (the usual 4-bit path)
  qalora             QA-LoRA, sum pooling, INT-k g32 (the GGUF's own codes at 4 bits), exact merge
  qalora-mean        the same with mean pooling (loraq before this bench's defaults)
  constants          QA-LoRA training each group's scale and offset only (rank 0), exact merge
  offsets            QA-LoRA training each group's offset only (rank 0), exact merge
  qalora+constants   QA-LoRA rank 16 and the groups' scales and offsets, exact merge
  dora               LoRA with DoRA's magnitudes, merged to 16-bit
  qadora             QA-LoRA with DoRA, exact merge (scales and offsets)
For each: validation loss and BLEU / ROUGE-L (greedy, 24 held-out attribute sets) of the deployed model,
trainable parameters, median step time, deployed weight size (16-bit tensors at 2 bytes). Every result is
appended to <out>/results.jsonl as it comes (a sweep can be stopped and run again: finished runs are
skipped); the table at the end shows each setup's best learning rate per bit width.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from loraq.product.train_config import default_lr

SETUPS = {
    "lora": {"method": "lora"},
    "qlora": {"method": "qlora"},
    "qalora": {"method": "qalora"},
    "qalora-mean": {"method": "qalora", "pooling": "mean"},
    "constants": {"method": "qalora", "rank": 0, "train_constants": "both"},
    "offsets": {"method": "qalora", "rank": 0, "train_constants": "offset"},
    "qalora+constants": {"method": "qalora", "train_constants": "both"},
    "dora": {"method": "lora", "dora": True},
    "qadora": {"method": "qalora", "dora": True},
}
# each setup's default: what `loraq train` picks for it (BEST_LR); mean pooling keeps the rate it was measured at
DEFAULT_LR = {name: default_lr(o["method"], o.get("rank", 16), o.get("train_constants", "none"))
              for name, o in SETUPS.items()} | {"qalora-mean": 1e-3}  # fmt: skip
# In this order (the QA-LoRA variants first); QLoRA's grid is LoRA's best two (its adapter is the same shape).
SWEEP_LRS = {"qalora": (5e-4, 1e-3, 2e-3), "constants": (3e-3, 1e-2, 3e-2), "lora": (5e-4, 1e-3, 2e-3),
             "qlora": (1e-3, 2e-3)}  # fmt: skip
# (A setup whose best is at the edge of its grid also gets the next rate past it: edge_step.)
# Swept at the best rate of the setup named: the combinations, then the low bit widths.
SWEEP_FOLLOW = [("offsets", 4, "constants"), ("qalora+constants", 4, "qalora"), ("qalora", 3, "qalora"),
                ("constants", 3, "constants"), ("qalora", 2, "qalora"), ("constants", 2, "constants")]  # fmt: skip
COMMON = dict(batch_size=8, rank=16, alpha=32.0, dropout=0.05, warmup_steps=10, max_grad_norm=1.0, eval_every=0,
              seed=0, group_size=32)  # fmt: skip


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as deployed: quantized layers as stored, every other tensor at 16 bits."""
    from loraq.quant.frozen import FrozenQuantized

    seen, total = set(), 0
    quantized = [m for m in model.modules() if isinstance(m, FrozenQuantized)]
    inside = {id(t) for m in quantized for t in list(m.buffers()) + list(m.parameters())}
    total += sum(m.storage_bytes() for m in quantized)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in inside or not t.is_floating_point():
            continue
        seen.add(id(t))
        total += t.numel() * 2
    return total


def as_16bit(model: nn.Module) -> nn.Module:
    """The model with every float weight rounded to bf16 (what a 16-bit export stores), computing in fp32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


class Bench:
    def __init__(self, out: Path, steps: int, bleu_inputs: int, rank: int = 16, compute_dtype: str = "fp32"):
        from loraq.product.data import load_examples, split_by_group

        self.out, self.steps, self.bleu_inputs = out, steps, bleu_inputs
        self.rank, self.compute_dtype = rank, compute_dtype
        self.splits = split_by_group(load_examples("e2e"))
        self.results = out / "results.jsonl"
        self.val_items = None

    def done(self) -> list[dict]:
        """The finished results at this bench's rank and compute dtype (older rows: r=16, fp32)."""
        if not self.results.is_file():
            return []
        rows = [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]
        mine = (self.rank, self.compute_dtype)
        return [r for r in rows if (r.get("rank", 16), r.get("compute_dtype", "fp32")) == mine]

    def rows(self, setup: str, bits: int) -> list[dict]:
        """The finished results of `setup` at `bits` and this bench's step count."""
        return [r for r in self.done() if r["setup"] == setup and r["bits"] == bits and r["steps"] == self.steps]

    def has(self, setup: str, bits: int, lr: float, seed: int = 0) -> bool:
        return any(r["setup"] == setup and r["bits"] == bits and r["lr"] == lr and r["steps"] == self.steps
                   and r.get("seed", 0) == seed for r in self.done())  # fmt: skip

    def score(self, model: nn.Module, tokenizer) -> dict:
        from loraq.core.inject import dequantize_base
        from loraq.product.data import encode_all
        from loraq.product.evaluate import generation_scores
        from loraq.product.train import evaluate_loss

        if self.val_items is None:
            self.val_items, _ = encode_all(tokenizer, self.splits.val, 256)
        size = weight_bytes(model) / 2**20
        # The same numbers, faster: a frozen layer multiplies by exactly its dequantized fp32 weight, so a copy
        # holding those weights computes the same, without dequantizing every layer for every generated token.
        model = dequantize_base(copy.deepcopy(model))
        loss = evaluate_loss(model, self.val_items, 16, tokenizer.pad_token_id)
        gen = generation_scores(model, tokenizer, self.splits.test, max_inputs=self.bleu_inputs, max_new_tokens=48)
        return {"val_loss": loss, "bleu": gen.bleu, "rouge_l": gen.rouge_l, "weight_mb": size}

    def run(self, setup: str, bits: int, lr: float, seed: int = 0) -> None:
        import loraq
        from loraq.quant.schemes import scheme_named

        if self.has(setup, bits, lr, seed):
            return
        name = f"{setup}-int{bits}-lr{lr:g}" + (f"-seed{seed}" if seed else "")
        name += f"-r{self.rank}" if self.rank != 16 else ""
        name += f"-{self.compute_dtype}" if self.compute_dtype != "fp32" else ""
        options = {**COMMON, **SETUPS[setup], "bits": bits, "lr": lr, "steps": self.steps, "seed": seed}
        if options["rank"]:
            options.update(rank=self.rank, alpha=2.0 * self.rank)
        options["compute_dtype"] = self.compute_dtype
        config = loraq.TrainConfig(out=str(self.out / name), overwrite=True, **options)
        print(f"{name}: training {self.steps} steps", flush=True)
        result = loraq.train(config, progress=False)
        metrics = [json.loads(line) for line in (self.out / name / "metrics.jsonl").read_text().splitlines()]
        run = {
            "setup": setup, "bits": bits, "lr": lr, "steps": self.steps, "seed": seed, "rank": self.rank,
            "compute_dtype": self.compute_dtype,
            "trainable": loraq.parameter_summary(result.model).trainable,
            "step_s": statistics.median(r["tokens"] / r["tok_s"] for r in metrics if "tok_s" in r),
            "train_val_loss": result.val_loss_after,
        }  # fmt: skip
        merged = loraq.merge(copy.deepcopy(result.model))
        deployed = []
        if SETUPS[setup]["method"] == "lora":
            deployed.append(("16-bit", as_16bit(merged)))
        elif setup == "qlora":
            for k in (4, 3, 2) if bits == 4 else ():
                requantized = copy.deepcopy(merged)
                scheme_named(f"int{k}", 32).quantize_model(requantized)
                deployed.append((f"INT{k} g32 RTN (re-quantized)", requantized))
            deployed.append(("16-bit", as_16bit(merged)))
        else:
            deployed.append((f"INT{bits} g32 (exact merge)", merged))
        for label, model in deployed:
            start = time.perf_counter()
            row = {**run, "deployed": label, **self.score(model, result.tokenizer)}
            with open(self.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {label:30s} val loss {row['val_loss']:.4f}  BLEU {row['bleu']:5.2f}  "
                  f"({time.perf_counter() - start:.0f} s to score)", flush=True)  # fmt: skip


def edge_step(rows: list[dict]) -> float | None:
    """The next learning rate to try when a deployed form's best is the highest (x2) or lowest (/2) tried."""
    tried = sorted({r["lr"] for r in rows})
    for r in best_rows(rows):
        if len(tried) > 1 and r["lr"] == tried[-1]:
            return tried[-1] * 2
        if len(tried) > 1 and r["lr"] == tried[0]:
            return tried[0] / 2
    return None


def deployed_bits(row: dict) -> int | None:
    label = row["deployed"]
    return int(label[3]) if label.startswith("INT") else None


def seed_means(rows: list[dict]) -> list[dict]:
    """One row per (setup, deployed form, bits, lr): the scores averaged over its seeds (`seeds`: how many,
    `val_loss_spread`: max - min of the validation loss)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setup"], r["deployed"], r["bits"], r["lr"]), []).append(r)
    means = []
    for runs in groups.values():
        mean = {k: statistics.mean(r[k] for r in runs) for k in ("val_loss", "bleu", "rouge_l", "step_s")}
        spread = max(r["val_loss"] for r in runs) - min(r["val_loss"] for r in runs)
        means.append({**runs[0], **mean, "seeds": len(runs), "val_loss_spread": spread})
    return means


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (setup, deployed form): the row of the best learning rate by deployed validation loss (seed means)."""
    best: dict[tuple, dict] = {}
    for r in seed_means(rows):
        key = (r["setup"], r["deployed"])
        if key not in best or r["val_loss"] < best[key]["val_loss"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (-(deployed_bits(r) or 16), r["val_loss"]))


def table(rows: list[dict], steps: int, rank: int = 16, compute_dtype: str = "fp32") -> str:
    lines = [
        f"Deployed models after {steps} steps (batch 8, r={rank} alpha={2 * rank}, {compute_dtype}; means over "
        "seeds); each setup at its best lr",
        "| setup | deployed as | lr | val loss (seeds, spread) | BLEU | ROUGE-L | trainable | step (s) | weights (MiB) "
        "| lrs tried |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in best_rows(rows):
        tried = sorted({x["lr"] for x in rows if x["setup"] == r["setup"] and x["deployed"] == r["deployed"]})
        lines.append(
            f"| {r['setup']} | {r['deployed']} | {r['lr']:g} | {r['val_loss']:.4f} ({r['seeds']}, "
            f"{r['val_loss_spread']:.4f}) | {r['bleu']:.2f} | "
            f"{r['rouge_l']:.3f} | {r['trainable']:,} | {r['step_s']:.2f} | {r['weight_mb']:.1f} | "
            f"{', '.join(f'{x:g}' for x in tried)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--bleu-inputs", type=int, default=24)
    ap.add_argument("--out", default="runs/bench-qalora")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, from: " + ", ".join(SETUPS))
    ap.add_argument("--bits", default="4", help="bit widths of the quantized setups, comma-separated")
    ap.add_argument("--lrs", default="", help="learning rates to run every setup at (default: each its own)")
    ap.add_argument("--seeds", default="0", help="seeds to run every setup with, comma-separated")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank) of the setups with one")
    ap.add_argument("--compute-dtype", default="fp32", choices=("fp32", "bf16"), help="the runs' --compute-dtype")
    ap.add_argument("--sweep", action="store_true", help="the learning-rate grid at 4 bits, then 3 and 2 bits at "
                    "each quantized setup's best 4-bit rate")  # fmt: skip
    ap.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, args.steps, args.bleu_inputs, args.rank, args.compute_dtype)
    setups = args.setups.split(",")
    unknown = set(setups) - set(SETUPS)
    if unknown:
        ap.error(f"unknown setups {sorted(unknown)}")
    if not args.table and args.sweep:
        for setup in [s for s in SWEEP_LRS if s in setups]:
            for lr in SWEEP_LRS[setup]:
                bench.run(setup, 4, lr)
            # a best rate at the edge of the rates tried is not known to be the best: step past it (at most twice)
            for _ in range(2):
                step = edge_step(bench.rows(setup, 4))
                if step is None:
                    break
                bench.run(setup, 4, step)
        for setup, bits, like in SWEEP_FOLLOW:
            rows = bench.rows(like, 4)
            if setup in setups and rows:
                bench.run(setup, bits, min(rows, key=lambda r: r["val_loss"])["lr"])
    elif not args.table:
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
        for setup in setups:
            widths = [int(b) for b in args.bits.split(",")] if SETUPS[setup]["method"] == "qalora" else [4]
            for bits in widths:
                for lr in lrs or [DEFAULT_LR[setup]]:
                    for seed in (int(x) for x in args.seeds.split(",")):
                        bench.run(setup, bits, lr, seed)
    print(table([r for r in bench.done() if r["steps"] == args.steps], args.steps, args.rank, args.compute_dtype))


if __name__ == "__main__":
    main()
