"""The demo: a real LoRA fine-tune of the default model on E2E NLG, with before/after results."""

from __future__ import annotations

import json
import textwrap

from .atomic import atomic_write_text
from .data import load_examples, split_by_group
from .generate import generate
from .models import DEFAULT_MODEL, load_model
from .train import TrainConfig, TrainResult, train

DEMO_CONFIG = dict(steps=60, batch_size=8, lr=1e-3, warmup_steps=6, rank=16, alpha=32.0, eval_every=20)


def run_demo(out: str = "runs/demo", steps: int | None = None) -> TrainResult:
    """Fine-tune SmolLM2-135M-Instruct on E2E NLG and print validation loss and three held-out samples,
    before and after. Writes the run folder `out` (adapter, config.json, metrics.jsonl, samples.json)."""
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

    config = TrainConfig(model=DEFAULT_MODEL, out=out, **{**DEMO_CONFIG, **({"steps": steps} if steps else {})})
    result = train(config, model, tokenizer)
    for s in samples:
        s["after"] = generate(result.model, tokenizer, s["prompt"], max_new_tokens=60)
    atomic_write_text(result.out / "samples.json", json.dumps(samples, indent=2) + "\n")

    print()
    print(
        f"validation loss   before {result.val_loss_before:.3f}   after {result.val_loss_after:.3f}"
        f"   ({config.steps} steps, {result.seconds / 60:.1f} min)"
    )
    for i, s in enumerate(samples, 1):
        print(f"\n[{i}] {s['prompt']}")
        for label in ("before", "after", "reference"):
            print(textwrap.fill(s[label], width=100, initial_indent=f"  {label:>9}: ", subsequent_indent=" " * 13))
    print(f"\nrun folder: {result.out}  (adapter/ in PEFT format, config.json, metrics.jsonl, samples.json)")
    return result
