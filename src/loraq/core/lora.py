"""The LoRA layer: a frozen linear layer plus named low-rank adapters, one active at a time.

        x ──────────────► base (frozen W0) ──────────────┐
        │                                                 + ──► y = W0·x + s·B·A·dropout(x)
        └──► dropout ──► A (r, in) ──► B (out, r) ──► ·s ─┘

B starts at zero, so a fresh adapter leaves the model unchanged. Merging adds s·B·A into W0 (computed in
float32, then cast), so a merged model costs nothing extra at inference; unmerging subtracts it again.

QA-LoRA (pool = L > 1): the input is summed over each group of L consecutive columns before A, which is
(r, in/L). The update s·B·A·sum_g(x) equals x times a weight that is constant inside every group,
s·(BA)[o, g], so it merges exactly into an INT-k base's per-group offsets when L is the base's group size;
its full-width form (`delta_weight`) repeats each column L times. (Mean pooling, the reference code's, is
the same with the update divided by L, which under Adam trains L times slower: DESIGN.md §8.) QA-LoRA can
also train the base's group constants themselves (`LoraAdapter.gamma`, `.delta`).

DoRA (`use_dora`, PEFT's definition): each output row o of the adapted weight is rescaled to a trained
magnitude m_o, W'[o] = k_o·(W0 + ΔW)[o] with k_o = m_o / ||(W0 + ΔW)[o]||, the norm detached in backward; m
starts at the row norms, so a fresh DoRA adapter changes nothing. The norm is computed each step without forming
W0 + ΔW: ||W0[o]||² is fixed (the base is frozen), and the two other terms need A·W0ᵀ (r rows, multiplied by the
weight the base dequantizes for the layer's input anyway) and B·(A·Aᵀ)·Bᵀ. In an INT-k base a pooled
update with DoRA stays exactly representable: scale' = k·scale, offset' = k·(offset + Δ), codes unchanged.

Which adapters merge exactly into which base, and how, is the base's scheme's answer (quant/schemes/).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraqError
from ..formats import gguf_blocks
from ..quant import native
from ..quant.frozen import FrozenQuantized, GgufLinear, IntLinear, backward_weight, forward_weight, matmul_dtype
from ..quant.schemes import Scheme, scheme_of
from .config import LoraConfig
from .layers import is_plain_linear, layer_shape, linear_weight


class LoraAdapter(nn.Module):
    """One adapter of a layer: the low-rank update A (r, in / pool), B (out, r) with its scaling, dropout and
    pooling window; for QA-LoRA with `train_constants`, also the group constants' changes `gamma` (scale) and
    `delta` (offset), each (out, in / pool) and zero at the start:

        scale' = scale · (1 + gamma)        offset' = offset + scale · delta

    Both are relative to the group's own scale, so one learning rate fits every layer under Adam, whatever
    the size of its weights (DESIGN.md §8). The frozen layer computes with scale' and offset' (quant/frozen.py).
    """

    def __init__(self, in_features: int, out_features: int, config: LoraConfig):
        super().__init__()
        self.r = config.r
        self.scaling = config.scaling
        self.pool = config.pool
        self.pool_scale = config.pool_scale if self.pool > 1 else 1.0
        self.pooling = config.pooling if self.pool > 1 else "sum"
        if in_features % self.pool:
            raise LoraqError(f"group size {self.pool} does not divide the layer's input size {in_features}")
        groups = in_features // self.pool
        self.A = nn.Parameter(torch.empty(config.r, groups))
        self.B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.r and config.init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / config.r)
        elif config.r:  # (rank 0: group constants alone, no low-rank update)
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        trains = config.train_constants
        self.gamma = nn.Parameter(torch.zeros(out_features, groups)) if trains in ("scale", "both") else None
        self.delta = nn.Parameter(torch.zeros(out_features, groups)) if trains in ("offset", "both") else None
        # DoRA: the magnitudes (set to the base's row norms by LoraLinear.add_adapter) and ||W0[o]||², fixed
        self.magnitude = nn.Parameter(torch.ones(out_features)) if config.use_dora else None
        self.register_buffer("base_norm_sq", torch.ones(out_features) if config.use_dora else None, persistent=False)
        # (DoRA on an INT-k base whose groups A is pooled over: each group's sum of codes, see _dora_norm_by_groups)
        self.register_buffer("base_code_sums", None, persistent=False)

    @property
    def trains_constants(self) -> bool:
        return self.gamma is not None or self.delta is not None

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.update(self.dropout(x))

    def update(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """s·B·A·pool(x), the input already dropped out (with `row_scale`, B's rows times it: DoRA's k)."""
        if self.pool > 1 or not torch.is_autocast_enabled(x.device.type):
            # (pooled sums in fp32; the fp32 copy is not kept for backward, only the pooled input is)
            x = x.to(self.A.dtype)
        # under autocast the input stays in its 16-bit dtype: the matmul keeps that very tensor for backward,
        # the one the base layer keeps too, instead of a second copy cast there and back
        if self.pooling == "mean":  # adapters saved before sum pooling: computed exactly as they were
            x = x.unflatten(-1, (-1, self.pool)).mean(dim=-1)
        elif self.pool > 1:
            x = x.unflatten(-1, (-1, self.pool)).sum(dim=-1)
        # Scale the r-wide intermediate rather than the out-wide result: same value, fewer multiplies.
        b = self.B if row_scale is None else self.B * row_scale[:, None].to(self.B.dtype)
        return F.linear(F.linear(x, self.A) * self.scaling, b)

    @torch.no_grad()
    def dora_norm(self, w0_a: torch.Tensor | None) -> torch.Tensor:
        """||(W0 + ΔW)[o]|| for every output row, fp32, from ||W0[o]||² (`base_norm_sq`) and `w0_a`, the base's
        weight times the expanded A, (r, out) = A·W0ᵀ (None at rank 0):
        ||W0 + ΔW||² = ||W0||² + Σ_r B[o,r]·(2s·(A·W0ᵀ)[r,o] + s²·(B·(A·Aᵀ))[o,r]). Detached, as PEFT's."""
        norm_sq = self.base_norm_sq
        if self.r and w0_a is not None:
            a, b = self.A.float(), self.B.float()
            # the expanded A repeats each pooled column `pool` times, times pool_scale: its A·Aᵀ is this
            gram = (a @ a.T) * (self.pool * self.pool_scale**2)
            terms = torch.addmm(w0_a.float().T, b, gram, beta=2 * self.scaling, alpha=self.scaling**2)
            norm_sq = norm_sq + (b * terms).sum(dim=1)
        return norm_sq.clamp(min=0).sqrt()

    def adapted_norms(self, w0: torch.Tensor) -> torch.Tensor:
        """||(W0 + ΔW)[o]|| per output row, fp32, from the base's weight `w0` (out, in) as it computes with it."""
        return torch.linalg.vector_norm(w0.float() + self.delta_weight().to(w0.device), dim=1)

    def dora_factor(self, w0: torch.Tensor) -> torch.Tensor:
        """k = m / ||(W0 + ΔW)[o]|| per output row: what a merge multiplies each row of W0 + ΔW by."""
        return self.magnitude.detach().float().to(w0.device) / self.adapted_norms(w0)

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """The adapted weight in fp32 from the base's `w0` (out, in): W0 + ΔW, with DoRA k·(W0 + ΔW) row by row."""
        weight = w0.float() + self.delta_weight().to(w0.device)
        if self.dora:
            weight *= (self.magnitude.detach().float().to(w0.device) / torch.linalg.vector_norm(weight, dim=1))[:, None]
        return weight

    def group_delta(self) -> torch.Tensor:
        """s·(B·A)·pool_scale in float32, shape (out, in / pool): the weight change of each group's columns."""
        return (self.B.float() @ self.A.float()) * (self.scaling * self.pool_scale)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update's full-width weight change in float32, shape (out, in), pooled columns repeated."""
        delta = self.group_delta()
        return delta.repeat_interleave(self.pool, dim=1) if self.pool > 1 else delta

    def expanded_A(self) -> torch.Tensor:
        """A as a plain LoRA A of shape (r, in): each pooled column repeated pool times (times 1/pool for mean
        pooling), so that a plain LoRA computes what the pooled adapter computes."""
        a = self.A.detach().float()
        return a.repeat_interleave(self.pool, dim=1) * self.pool_scale if self.pool > 1 else a


def _scale_rows_by_k(weight: torch.Tensor, magnitude: torch.Tensor, adapter, rows):
    """k = m / ||(W0 + ΔW)[o]|| with the norm's A·W0ᵀ from `weight` (W0 in the input's dtype; `rows` None at rank
    0), and `weight`'s rows scaled by k in place. Returns (k fp32, k as the weight was scaled by, norm)."""
    norm = adapter.dora_norm(None if rows is None else F.linear(rows.to(weight.dtype), weight)).to(magnitude.device)
    k = magnitude.detach().float() / norm
    scale = k.to(weight.dtype)
    weight.mul_(scale[:, None])
    return k, scale, norm


class _DoraPlainMatmul(torch.autograd.Function):
    """DoRA on a full-precision base without dropout: (x·(k∘W0)ᵀ, k), as `_DoraFrozenMatmul` computes it on a
    quantized one. The weight is cast to the input's dtype (the copy autocast would make anyway), A·W0ᵀ taken from
    that copy for the norm, and its rows scaled in place; the copy is not kept: the backward multiplies (g∘k) by
    W0, so DoRA keeps only its 16-bit output beside what LoRA keeps (scaling the outputs instead kept them in the
    residual stream's fp32, and passed over them three more times)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, magnitude: torch.Tensor, w0: torch.Tensor, adapter, rows):
        weight = w0.to(x.dtype, copy=True)
        k, scale, norm = _scale_rows_by_k(weight, magnitude, adapter, rows)
        y = F.linear(x, weight)
        ctx.save_for_backward(w0, y, scale, norm)
        ctx.magnitude_dtype = magnitude.dtype
        return y, k

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_k: torch.Tensor):
        w0, y, scale, norm = ctx.saved_tensors
        grad_x = (grad * scale.to(grad.dtype)) @ w0.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_m = _magnitude_grad(ctx, grad, grad_k, y, scale, norm) if ctx.needs_input_grad[1] else None
        return grad_x, grad_m, None, None, None


def _magnitude_grad(ctx, grad: torch.Tensor, grad_k: torch.Tensor, y: torch.Tensor, scale, norm) -> torch.Tensor:
    """dL/dm of y = x·(k∘W0)ᵀ: dL/dk = Σ_t g·(x·W0ᵀ) + the update's part, x·W0ᵀ = y / k with k as the weight was
    scaled by; dk/dm = 1 / norm. (fp16's range cannot hold the products: formed in fp32.)"""
    through_base = native.column_dots(grad, y)  # (bf16 on a CPU: in C, in one pass)
    if through_base is None:
        product = grad.float() * y.float() if grad.dtype == torch.float16 else grad * y
        through_base = product.sum(dim=tuple(range(grad.dim() - 1)), dtype=torch.float32)
    through_base = through_base / scale.float()
    return ((through_base + grad_k.float()) / norm).to(ctx.magnitude_dtype)


def _dora_norm_by_groups(adapter: LoraAdapter, layer: FrozenQuantized) -> torch.Tensor | None:
    """||(W0 + ΔW)[o]|| (fp32) of an INT-k base under an A pooled over its groups, without forming the weight:
    ΔW is constant over each group (D = `group_delta`), so ||W0 + ΔW||² = ||W0||² + Σ_g D·(2·G + L·D), G each
    group's sum of weights, scale·Σcodes + L·offset (the code sums kept since the adapter started,
    `base_code_sums`). None where that does not hold. Detached, as PEFT's norm."""
    sums = adapter.base_code_sums
    if sums is None:
        return None
    c, group = adapter.scaling * adapter.pool_scale, layer.group_size
    b, a = adapter.B.detach(), adapter.A.detach()
    norm = native.dora_group_norms(b, a, c, layer.scale, layer.offset, sums, group, adapter.base_norm_sq)
    if norm is not None:  # (in C: one call instead of a dozen small ops, which cost more than their arithmetic)
        return norm
    with torch.no_grad(), torch.autocast(sums.device.type, enabled=False):  # (fp32: not autocast's 16 bits)
        twice_sums = torch.addcmul(layer.offset.float() * (2 * layer.group_size), layer.scale, sums, value=2.0)
        delta = adapter.group_delta()
        norm_sq = adapter.base_norm_sq + (delta * torch.add(twice_sums, delta, alpha=layer.group_size)).sum(dim=1)
        return norm_sq.clamp(min=0).sqrt()


class _DoraFrozenMatmul(torch.autograd.Function):
    """DoRA on a quantized base without dropout: (x·(k∘W0)ᵀ, k), k = m / ||(W0 + ΔW)[o]|| per output row.

    The row scale goes into the weight the base dequantizes anyway rather than over the (tokens, out) outputs,
    and the caller scales B's rows by the returned k for the update. Where k can come first (an INT-k base under
    an A pooled over its groups, `_dora_norm_by_groups`, or rank 0), it goes into the group constants the weight is
    dequantized with (`FrozenQuantized.scaled_weight`): DoRA forms no weight of its own. Otherwise the norm needs
    A·W0ᵀ from the dequantized weight, whose rows are then scaled in place (in its workspace buffer), forward and
    backward. The norm is detached, as in PEFT. DoRA then adds one pass over the outputs: the magnitudes' gradient,
    dL/dm = Σ_t g·y / (k·norm) (y = k·x·W0ᵀ, so x·W0ᵀ = y / k), from the saved 16-bit output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, magnitude: torch.Tensor, layer: FrozenQuantized, adapter, rows):
        norm = _dora_norm_by_groups(adapter, layer)
        ctx.folded = norm is not None or rows is None
        if ctx.folded:
            norm = (adapter.dora_norm(None) if norm is None else norm).to(magnitude.device)
            k = scale = magnitude.detach().float() / norm
            weight = forward_weight(ctx, layer, x.dtype, row_scale=scale)
        else:
            weight = forward_weight(ctx, layer, x.dtype)
            k, scale, norm = _scale_rows_by_k(weight, magnitude, adapter, rows)
        y = F.linear(x, weight)
        ctx.save_for_backward(weight if ctx.shared else None, y, scale, norm)
        ctx.magnitude_dtype = magnitude.dtype
        return y, k

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_k: torch.Tensor):
        weight, y, scale, norm = ctx.saved_tensors
        grad_x = grad_m = None
        if ctx.needs_input_grad[0]:
            if ctx.folded:
                weight = backward_weight(ctx, grad.dtype, weight, row_scale=scale)
            elif not ctx.shared:
                weight = backward_weight(ctx, grad.dtype, None).mul_(scale[:, None])
            grad_x = grad @ weight.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_m = _magnitude_grad(ctx, grad, grad_k, y, scale, norm)
        return grad_x, grad_m, None, None, None


class LoraLinear(nn.Module):
    """A frozen linear layer (`nn.Linear`, a GPT-2 `Conv1D`, or a quantized one) with named adapters beside it.

    At most one adapter is active (or merged) at a time.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None
        self.disabled = False
        self._written: tuple[tuple, torch.Tensor | None] | None = None  # (adapter state, written_weight)

    @property
    def in_features(self) -> int:
        return layer_shape(self.base)[1]

    @property
    def out_features(self) -> int:
        return layer_shape(self.base)[0]

    def add_adapter(self, config: LoraConfig) -> LoraAdapter:
        name = config.adapter_name
        if name in self.adapters:
            raise LoraqError(f"adapter {name!r} already exists on this layer; pick another adapter_name")
        adapter = LoraAdapter(self.in_features, self.out_features, config)
        device = next(iter(self.base.state_dict().values())).device
        if device.type != "meta":  # (a base built on meta to load into shards: the adapter keeps its values)
            adapter.to(device=device)
        if adapter.dora:
            self._start_dora(adapter, device)
        self.adapters[name] = adapter
        return adapter

    def _start_dora(self, adapter: LoraAdapter, device: torch.device) -> None:
        scheme = self._scheme()
        if scheme.merge_rounds(adapter):
            raise LoraqError(
                f"DoRA on a {scheme.describe()} base: its format holds no free offset, so training computes with the "
                "rounded merge; train DoRA on a Q4_1/INT-k base (--method qalora) or a 16-bit one"
            )
        if device.type != "meta":  # (a base built on meta to load into shards: the loader starts them once loaded)
            self.start_dora(adapter)

    @torch.no_grad()
    def start_dora(self, adapter: LoraAdapter) -> None:
        """||W0[o]||² of the weight the base computes with (dequantized), and m = ||W0 + ΔW|| (= ||W0|| while B
        is zero): a fresh DoRA adapter changes nothing."""
        weight = self._scheme().dequantize(self.base).float()
        adapter.base_norm_sq.copy_(weight.pow(2).sum(dim=1))
        adapter.magnitude.copy_(adapter.adapted_norms(weight))
        base = self.base
        if adapter.r and isinstance(base, IntLinear) and adapter.pool == base.group_size:
            sums = base.codes().view(base.out_features, -1, base.group_size).sum(dim=2, dtype=torch.int32)
            fits_16_bits = (2**base.bits - 1) * base.group_size < 2**15
            adapter.base_code_sums = sums.to(torch.int16 if fits_16_bits else torch.int32)

    def set_active(self, name: str) -> None:
        if name not in self.adapters:
            raise LoraqError(f"no adapter named {name!r}; this model has {sorted(self.adapters)}")
        if self.merged is not None and self.merged != name:
            raise LoraqError(f"adapter {self.merged!r} is merged; unmerge it before switching to {name!r}")
        self.active = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None or self.disabled or self.merged is not None:
            return self.base(x)
        adapter = self.adapters[self.active]
        out_dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):  # one 16-bit copy of the input, for base and adapter alike
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if adapter.dora:
            return self._dora_forward(x, adapter, out_dtype)
        written = self._written_weight(adapter) if adapter.r else None
        if written is not None:
            # The base's format cannot hold every update exactly (GGUF types without free offsets): compute with
            # the weights the merged file will hold, and pass the gradient to the adapter as if they held its
            # update (straight-through). The model trained and validated is then the file that is written.
            z = adapter(x).to(out_dtype)
            bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
            return F.linear(x, written.to(x.dtype), bias).to(out_dtype) + (z - z.detach())
        # with trained group constants the base computes with them
        y = self.base(x, adapter.gamma, adapter.delta) if adapter.trains_constants else self.base(x)
        if isinstance(self.base, FrozenQuantized):  # (a quantized layer answers in its input's dtype)
            y = y.to(out_dtype)
        return y + adapter(x).to(y.dtype) if adapter.r else y

    def _dora_forward(self, x: torch.Tensor, adapter: LoraAdapter, out_dtype: torch.dtype) -> torch.Tensor:
        """PEFT's DoRA: y = W0·x + b + (k - 1)·W0·x_d + k·s·B·A·x_d, x_d the dropped-out input (x itself without
        dropout: then y = k·(W0·x + s·B·A·x) + b). A quantized base gives A·W0ᵀ from the same dequantization, and
        with dropout multiplies x and x_d in one product (one dequantization, forward and backward, for both)."""
        if isinstance(adapter.dropout, nn.Identity) or not self.training:
            return self._dora_scaled_rows(x, adapter, out_dtype)
        dropped = adapter.dropout(x)
        bias = getattr(self.base, "bias", None)
        quantized = isinstance(self.base, FrozenQuantized)
        inputs = torch.cat([x, dropped]) if quantized else dropped
        norm = _dora_norm_by_groups(adapter, self.base) if quantized else None
        if adapter.r and norm is None:
            out, w0_a = self._base_and_rows(inputs, adapter.expanded_A().to(x.device))
            norm = adapter.dora_norm(w0_a)
        else:
            out = self.base(inputs)
            norm = adapter.dora_norm(None) if norm is None else norm
        base_x, base_d = out.split(len(x)) if quantized else (self.base(x), out)
        k = (adapter.magnitude / norm.to(adapter.magnitude.device)).to(out_dtype)
        no_bias = base_d if bias is None else base_d.to(out_dtype) - bias.to(out_dtype)
        y = base_x.to(out_dtype) + (k - 1) * no_bias.to(out_dtype)
        return y + k * adapter.update(dropped).to(out_dtype) if adapter.r else y

    def _dora_scaled_rows(self, x: torch.Tensor, adapter: LoraAdapter, out_dtype: torch.dtype) -> torch.Tensor:
        """y = x·(k∘W0)ᵀ + b + s·(k∘B)·A·x: the row scale in the base's weight and in B, not over the outputs."""
        quantized = isinstance(self.base, FrozenQuantized)
        # (the expanded A only where the norm needs the weight: not over an INT-k base's own groups)
        rows = adapter.expanded_A().to(x.device) if adapter.r and adapter.base_code_sums is None else None
        x_mm = x.to(matmul_dtype(x))
        if quantized:
            y, k = _DoraFrozenMatmul.apply(x_mm, adapter.magnitude, self.base, adapter, rows)
        else:
            w0 = linear_weight(self.base).detach()
            y, k = _DoraPlainMatmul.apply(x_mm, adapter.magnitude, w0, adapter, rows)
        y = y.to(out_dtype)
        if self.base.bias is not None:
            y = y + self.base.bias.to(out_dtype)
        return y + adapter.update(x, k).to(out_dtype) if adapter.r else y

    def _base_and_rows(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(base(x), rows·W0ᵀ): a quantized base dequantizes once for both."""
        if isinstance(self.base, FrozenQuantized):
            return self.base.forward_with_rows(x, rows)
        weight = linear_weight(self.base).detach()
        return self.base(x), F.linear(rows.to(weight.dtype), weight)

    def _written_weight(self, adapter: LoraAdapter) -> torch.Tensor | None:
        scheme = self._scheme()
        if not scheme.merge_rounds(adapter):
            return None
        # Computed again only when the adapter or the base changed (an optimizer step, a load, a merge):
        # validation and generation reuse it.
        tensors = (adapter.A, adapter.B, *self.base.quantized_tensors().values())
        key = (id(adapter), *((t.data_ptr(), t._version) for t in tensors))
        if self._written is None or self._written[0] != key:
            self._written = (key, scheme.written_weight(self.base, adapter))
        return self._written[1]

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapter into the base, in the base's own format: into a full-precision weight (in
        float32, then cast back), or a QA-LoRA adapter into an INT-k base's group offsets (codes untouched).

        Raises:
            LoraqError: the base cannot take this adapter exactly (an NF4 base, or INT-k under a plain
                LoRA); `loraq.merge(model)` dequantizes such a base instead.
        """
        if self.merged is not None or self.active is None:
            return
        adapter = self.adapters[self.active]
        if adapter.dora:
            self._merge_dora(adapter)
        else:
            self._scheme().merge(self.base, adapter)
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter from the base again (exact up to the rounding of the stored values; a
        DoRA merge is undone exactly, from the values it kept)."""
        if self.merged is None:
            return
        adapter = self.adapters[self.merged]
        if adapter.dora:
            for name, kept in self._dora_kept.items():
                getattr(self.base, name).copy_(kept)
            del self._dora_kept
        else:
            self._scheme().merge(self.base, adapter, sign=-1.0)
        self.merged = None

    def merges_in_format(self) -> bool:
        """Whether the active adapter merges into the base in place, keeping the base's format."""
        if self.active is None:
            return False
        adapter = self.adapters[self.active]
        if adapter.dora:
            return self._dora_targets(adapter) is not None
        return self._scheme().merges_in_format(adapter.pool)

    def _dora_targets(self, adapter: LoraAdapter) -> tuple[str, ...] | None:
        """The base tensors a DoRA merge rewrites: a full-precision weight, an INT-k base's scale and offset (the
        update pooled over its groups, or none at rank 0), or at rank 0 a GGUF layer's blocks (their fp16 scales);
        None where the format cannot hold it exactly."""
        if is_plain_linear(self.base):
            return ("weight",)
        if isinstance(self.base, IntLinear) and (not adapter.r or adapter.pool == self.base.group_size):
            return ("scale", "offset")
        if isinstance(self.base, GgufLinear) and not adapter.r:  # the row factor alone: every type's block scales
            return ("blocks",)
        return None

    def _merge_dora(self, adapter: LoraAdapter) -> None:
        """W' = k·(W0 + ΔW), k = m / ||W0 + ΔW|| per row: into a full-precision weight (fp32, one rounding), or
        exactly into an INT-k base's constants, scale' = k·scale and offset' = k·(offset + Δ) (codes unchanged,
        fp16 rounding of the constants). The replaced tensors are kept so that unmerge restores them exactly."""
        targets = self._dora_targets(adapter)
        if targets is None:
            where = self._scheme().describe()
            raise LoraqError(f"a DoRA adapter cannot be merged exactly into a {where} base; use loraq.merge(model)")
        weight = self._scheme().dequantize(self.base).float()
        self._dora_kept = {name: getattr(self.base, name).detach().clone() for name in targets}
        if targets == ("weight",):
            stored = linear_weight(self.base)
            stored.copy_(adapter.merged_weight(weight).to(stored.dtype))
            return
        k = adapter.dora_factor(weight)
        if targets == ("blocks",):
            self.base.blocks.copy_(gguf_blocks.scale_rows(self.base.blocks, self.base.type_name, k))
            return
        base: IntLinear = self.base
        group_delta = adapter.group_delta().to(weight.device) if adapter.r else 0.0
        scale, offset = base.scale.float(), base.offset.float()
        base.scale.copy_((k[:, None] * scale).to(base.scale.dtype))
        base.offset.copy_((k[:, None] * (offset + group_delta)).to(base.offset.dtype))

    def _scheme(self) -> Scheme:
        scheme = scheme_of(self.base)
        assert scheme is not None, f"{type(self.base).__name__} is not a linear layer"
        return scheme

    def extra_repr(self) -> str:
        ranks = {name: a.r if a.pool == 1 else f"{a.r} (pool {a.pool})" for name, a in self.adapters.items()}
        return f"adapters={ranks}, active={self.active!r}, merged={self.merged!r}"
