"""The training loss without the logits: the output head and the cross-entropy computed a chunk of labelled
positions at a time, each chunk's logits recomputed in backward, so no (tokens x vocab) tensor outlives its
chunk (DESIGN.md §11: with checkpointing the logits and their gradient were 89% of a step's peak).

    hidden (N, H) ──► chunk ──► head ──► logits (c, V), fp32 ──► logsumexp - logit[target] ──► Σ
                        └─ backward: the chunk's logits again ─► softmax - onehot ─► grad hidden (c, H)

Only positions that carry a label are passed in (N of them), and the logsumexp is taken in fp32 whatever the
compute dtype. The value equals `F.cross_entropy(reduction="sum")` on the full logits up to the order of the
sums; the head itself is frozen (no weight gradient), as every loraq method keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.layers import rows_linear, times_rows

CHUNK_TOKENS = 1024  # positions per chunk: (1024 x vocab) fp32 logits at a time, 192 MiB at a 49K vocabulary


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            logits = _logits(hidden[start:stop], weight, bias, dtype)
            lse[start:stop] = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
            total += (lse[start:stop] - picked).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            # d(lse - logit[t]) / d logits = softmax - onehot(t), computed in place on the chunk's logits
            probs = _logits(hidden[start:stop], weight, bias, ctx.dtype).sub_(lse[start:stop, None]).exp_()
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, targets[start:stop]] -= 1.0
            grad_hidden[start:stop] = times_rows(probs.mul_(grad).to(ctx.dtype), weight).to(hidden.dtype)
        return grad_hidden, None, None, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """One chunk's logits, multiplied in the compute dtype (as autocast would), returned fp32. A 16-bit stored
    head under fp32 compute is cast a slice of the vocabulary at a time (layers.rows_linear)."""
    with torch.autocast(hidden.device.type, enabled=False):
        if weight.dtype != dtype:
            return rows_linear(hidden.to(dtype), weight, bias).float()
        b = None if bias is None else bias.to(dtype)
        return F.linear(hidden.to(dtype), weight, b).float()


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Σ cross-entropy of `head(hidden)` against `targets`, never holding more than `chunk` rows of logits.

    Args:
        hidden: (N, H), the final hidden states of the labelled positions only.
        weight, bias: the output head's (frozen: they get no gradient).
        targets: (N,) token ids (no ignore index: unlabelled positions are left out beforehand).

    The multiplication runs in autocast's dtype where autocast is on (else the hidden states'), the logsumexp
    in fp32.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _ChunkedHeadLoss.apply(
        hidden, weight.detach(), None if bias is None else bias.detach(), targets, chunk, dtype
    )
