"""LoRA vs QLoRA vs QA-LoRA on the default model and the demo data, side by side (same data, steps, seed):
what each deploys as, how good that deployed model is, and how large.

    .venv/bin/python bench/qalora.py [--steps 40] [--bleu-inputs 24]

(a) LoRA, merged to 16-bit; (b) QLoRA merged to 16-bit; (c) QLoRA merged then re-quantized to INT-k g32 RTN
(today's deployable 4-bit path); (d) QA-LoRA INT-k g32 (the GGUF's own codes at 4 bits) merged exactly.
For each: validation loss, BLEU / ROUGE-L of greedy generations on held-out attribute sets, trainable
parameters, median step time, and weight bytes as deployed (16-bit tensors at 2 bytes). Then the merge error
of the QA-LoRA INT4 exports: GGUF Q4_1 (exact) and GPTQ (integer zero points). Writes results.json.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bleu-inputs", type=int, default=24)
    ap.add_argument("--out", default="runs/bench-qalora")
    ap.add_argument("--methods", default="lora,qlora,qalora4,qalora3,qalora2", help="which runs, comma-separated")
    ap.add_argument("--exports", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--requantized", action=argparse.BooleanOptionalAction, default=True, help="score (c)")
    args = ap.parse_args()

    import loraq
    from loraq.product.data import encode_all, load_examples, split_by_group
    from loraq.product.evaluate import generation_scores
    from loraq.product.export import merge_run
    from loraq.product.train import evaluate_loss
    from loraq.quant.schemes import scheme_named

    out = Path(args.out)
    splits = split_by_group(load_examples("e2e"))
    common = dict(steps=args.steps, batch_size=8, lr=1e-3, warmup_steps=4, rank=16, alpha=32.0, eval_every=0, seed=0)
    rows: list[dict] = []
    val_items = None

    def score(label: str, model: nn.Module, tokenizer, run: dict) -> None:
        nonlocal val_items
        if val_items is None:
            val_items, _ = encode_all(tokenizer, splits.val, 256)
        start = time.perf_counter()
        loss = evaluate_loss(model, val_items, 16, tokenizer.pad_token_id)
        gen = generation_scores(model, tokenizer, splits.test, max_inputs=args.bleu_inputs, max_new_tokens=48)
        row = {"setup": label, "val_loss": loss, "bleu": gen.bleu, "rouge_l": gen.rouge_l, **run}
        row["weight_mb"] = weight_bytes(model) / 2**20
        rows.append(row)
        print(
            f"  {label:34s} val loss {loss:.4f}  BLEU {gen.bleu:5.2f}  ROUGE-L {gen.rouge_l:.4f}  "
            f"{row['weight_mb']:7.1f} MiB  ({time.perf_counter() - start:.0f} s to score)",
            flush=True,
        )

    chosen = args.methods.split(",")
    runs = [(m[:6], int(m[6:])) if m.startswith("qalora") else (m, 4) for m in chosen]
    for method, bits in runs:
        name = method if method != "qalora" else f"qalora-int{bits}"
        config = loraq.TrainConfig(method=method, bits=bits, group_size=32, out=str(out / name), **common)
        print(f"{name}: training {args.steps} steps", flush=True)
        result = loraq.train(config, progress=False)
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r["tokens"] / r["tok_s"] for r in records if "tok_s" in r]
        run = {
            "trainable": loraq.parameter_summary(result.model).trainable,
            "step_s": statistics.median(steps),
            "train_min": result.seconds / 60,
        }
        merged = loraq.merge(copy.deepcopy(result.model))
        tok = result.tokenizer
        if method == "lora":
            score("(a) LoRA -> 16-bit", as_16bit(merged), tok, run)
        elif method == "qlora":
            for k in (4, 3, 2) if args.requantized else ():
                requantized = copy.deepcopy(merged)
                scheme_named(f"int{k}", 32).quantize_model(requantized)
                score(f"(c) QLoRA -> INT{k} g32 RTN", requantized, tok, run)
            score("(b) QLoRA -> 16-bit", as_16bit(merged), tok, run)
        else:
            score(f"(d) QA-LoRA INT{bits} g32, exact merge", merged, tok, run)
        del result, merged

    exports = {}
    for fmt, target in (("gguf", out / "qalora-int4.gguf"), ("gptq", out / "qalora-int4-gptq")) if args.exports else ():
        report = merge_run(out / "qalora-int4", target, format=fmt, prompts=16)
        exports[fmt] = {
            "mean_abs_delta_logits": report.error,
            "exact_merge": report.exact_error,
            "bytes": report.bytes_written,
        }
        print(f"  export {fmt}: {report}", flush=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "exports": exports}, indent=2) + "\n")

    print(
        f"\n{args.steps} steps, batch 8, lr 1e-3, r=16 on all 7 projections, seed 0; BLEU on "
        f"{args.bleu_inputs} held-out attribute sets"
    )
    print("| setup | val loss | BLEU | ROUGE-L | trainable | step (s) | weights (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["setup"]):
        print(
            f"| {r['setup']} | {r['val_loss']:.4f} | {r['bleu']:.2f} | {r['rouge_l']:.4f} | {r['trainable']:,} | "
            f"{r['step_s']:.2f} | {r['weight_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
