"""GPTQ (Frantar et al. 2022): INT-k quantization calibrated on a layer's inputs.

GPTQ quantizes the columns of a row one at a time and spreads each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian H = 2·XᵀX of the layer's calibration inputs. Groups are
contiguous and taken in order (no act-order), so the result has round-to-nearest's layout (intk.py) and a
QA-LoRA adapter still merges exactly into its group offsets. Runs on the weight's device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .intk import check_bits_and_group


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ INT-k with contiguous groups and no act-order; the same outputs as `quantize_rtn`.

    Args:
        hessian: (in, in), the sum of xᵀx over the layer's calibration inputs (any positive multiple works).
        damp: added to the diagonal, as a fraction of its mean, to keep H invertible.
    """
    out_features, in_features = weight.shape
    check_bits_and_group(bits, group_size, in_features)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # columns whose input is always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(in_features, device=h.device) * damp * torch.mean(torch.diag(h))
    # The upper Cholesky factor of H^-1 gives each column's error-propagation row in one go.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmax = 2**bits - 1
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=w.device)
    groups = in_features // group_size
    scale = torch.zeros(out_features, groups, device=w.device)
    low = torch.zeros(out_features, groups, device=w.device)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            g = col // group_size
            if col % group_size == 0:  # the group's range, from the weights as updated by earlier blocks
                span = w[:, col : col + group_size]
                lo, hi = span.amin(dim=1), span.amax(dim=1)
                scale[:, g], low[:, g] = (hi - lo) / qmax, lo
            inverse = torch.where(scale[:, g] > 0, 1.0 / scale[:, g], torch.zeros_like(scale[:, g]))
            q = torch.floor((w_block[:, i] - low[:, g]) * inverse + 0.5).clamp_(0, qmax)
            codes[:, col] = q.to(torch.uint8)
            quantized = q * scale[:, g].half().float() + low[:, g].half().float()
            err = (w_block[:, i] - quantized) / h_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ h_inv[start:end, end:]
    return codes, scale.half(), low.half()


@torch.no_grad()
def collect_hessians(model: nn.Module, names: list[str], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Σ xᵀx of the inputs of the layers `names` over `batches` (dicts with input_ids and attention_mask),
    padded positions left out, in fp32 on each layer's device. All layers are measured in one pass of the
    full-precision model."""
    from ..core.layers import layer_shape

    sums: dict[str, torch.Tensor] = {}
    for name in names:
        module = model.get_submodule(name)
        in_features = layer_shape(module)[1]
        sums[name] = torch.zeros(in_features, in_features, device=next(module.parameters()).device)
    mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(module, args, output) -> None:
            x = args[0].detach().float()
            x = x[mask[0].to(x.device).bool()] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            sums[name] += x.T @ x

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"]]
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
    return sums
