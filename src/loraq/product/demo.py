"""The demo: fine-tune the default model's own 4-bit GGUF with QA-LoRA on E2E NLG and write the fine-tuned
model back as a GGUF of the same size, with before/after results.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF: its weights are INT4 codes in groups of 32. QA-LoRA trains on
those codes as they are (no second rounding, unlike NF4) and folds the adapter into the groups' offsets, so
the result is again a Q4_1 file that llama.cpp-family runtimes and transformers load.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from ..atomic import atomic_write_text
from .data import load_examples, split_by_group
from .export import merge_run
from .generate import generate
from .models import DEFAULT_MODEL, gguf_source, load_model
from .train import TrainConfig, TrainResult, train

# 40 steps keep `make demo` under 10 minutes on 2 cores (60 steps: 12 min 17 s wall, val loss 1.094; README)
DEMO_CONFIG = dict(
    method="qalora", bits=4, group_size=32, steps=40, batch_size=8, lr=1e-3, warmup_steps=4, rank=16, alpha=32.0,
    eval_every=20,
)  # fmt: skip
GGUF_NAME = "smollm2-135m-instruct-e2e.Q4_1.gguf"


def run_demo(out: str = "runs/demo", steps: int | None = None) -> TrainResult:
    """Fine-tune SmolLM2-135M-Instruct (its Q4_1 GGUF codes) on E2E NLG with QA-LoRA; print validation loss
    and three held-out samples before and after; write the fine-tuned Q4_1 GGUF and check that transformers
    loads it. The run folder `out` holds the adapter (PEFT format), config.json, metrics.jsonl,
    samples.json and the GGUF."""
    model, tokenizer = load_model(DEFAULT_MODEL)
    test = split_by_group(load_examples("e2e")).test
    first_of_group = {}
    for ex in test:  # attribute sets never seen in training; take three spread over the test split
        first_of_group.setdefault(ex.group, ex)
    groups = list(first_of_group.values())
    picks = [groups[i * len(groups) // 3] for i in range(min(3, len(groups)))]
    samples = [{"prompt": ex.prompt, "reference": ex.response} for ex in picks]
    for s in samples:
        s["before"] = generate(model, tokenizer, s["prompt"], max_new_tokens=60)

    # overwrite: `make demo` can be run again and replaces its previous run
    options = {**DEMO_CONFIG, **({"steps": steps} if steps else {})}
    config = TrainConfig(model=DEFAULT_MODEL, out=out, overwrite=True, **options)
    result = train(config, model, tokenizer)
    for s in samples:
        s["after"] = generate(result.model, tokenizer, s["prompt"], max_new_tokens=60)

    print("loraq: merging the adapter into the INT4 group offsets and writing the GGUF", file=sys.stderr, flush=True)
    report = merge_run(result.out, result.out / GGUF_NAME, format="gguf", prompts=16)
    written = _load_written_gguf(report.out)
    samples[0]["after, from the written GGUF"] = generate(written, tokenizer, samples[0]["prompt"], max_new_tokens=60)
    atomic_write_text(result.out / "samples.json", json.dumps(samples, indent=2) + "\n")

    source = gguf_source(DEFAULT_MODEL)
    print()
    print(
        f"validation loss   before {result.val_loss_before:.3f}   after {result.val_loss_after:.3f}"
        f"   ({config.steps} steps of QA-LoRA on the GGUF's INT4 codes, {result.seconds / 60:.1f} min)"
    )
    for i, s in enumerate(samples, 1):
        print(f"\n[{i}] {s['prompt']}")
        for label in ("before", "after", "after, from the written GGUF", "reference"):
            if label in s:
                text = textwrap.fill(s[label], width=100, initial_indent=f"  {label:>9}: ", subsequent_indent="    ")
                print(text)
    print(
        f"\nGGUF in:  {source.name}  {source.stat().st_size / 2**20:.1f} MiB\n"
        f"GGUF out: {report.out}  {report.bytes_written / 2**20:.1f} MiB (Q4_1, same layout; mean |delta logits| "
        f"vs the trained model {report.error:.5f})"
    )
    print(f"run folder: {result.out}  (adapter/ in PEFT format, config.json, metrics.jsonl, samples.json)")
    return result


def _load_written_gguf(path: Path):
    """The written file, loaded by transformers itself (not by loraq): proof that a runtime reads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
