"""Frozen quantized linear layers: they hold only packed codes and constants, and dequantize on every use.

The codes and constants are frozen parameters (requires_grad False), laid out row-major with the output rows
first (NF4 packed (out, in/2) and absmax (out, in/blocksize); INT-k packed (out, in·bits/8), scale and offset
(out, groups); GGUF blocks (out, bytes)), so that FSDP2 shards them by rows like any weight (it shards
parameters, never buffers) and each process can quantize only its own rows. Files keep their own layouts:
the schemes reshape on save and load.

The matmul is one autograd.Function shared by every format: it dequantizes again in backward instead of
saving the full-precision weight (inside a block that checkpointing recomputes, the recompute's weight serves the
backward: see _FrozenMatmul), and returns no gradient for it, so gradients flow to the input (and to adapters
below) only. Nothing is cached between calls, so no inference call can change how a later training
call behaves. The dtype of the matmul is autocast's where autocast is on, else the input's; the output comes
back in the input's dtype (as bitsandbytes' Linear4bit).

How a layer is made from a full-precision weight, saved, exported and merged into is its scheme's business
(quant/schemes/); the layer itself only computes.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import gguf_blocks
from . import native
from .intk import check_bits_and_group, dequantize_packed, pack_rows, unpack_codes
from .nf4 import NF4State, code_4bit, dequantize_4bit
from .workspace import Workspace, output

MIN_TRITON = (3, 0)


@functools.cache
def cuda_kernels():
    """quant.kernels where Triton can compile for CUDA here, else None (said once): CUDA tensors then take
    the PyTorch path, which is correct and slower."""
    try:
        import triton

        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
        if version < MIN_TRITON:
            raise ImportError(f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}")
        from . import kernels
    except ImportError as e:
        print(f"loraq: no Triton kernels for the 4-bit layers ({e}); CUDA uses the PyTorch path", file=sys.stderr)
        return None
    return kernels


def _kernels_for(t: torch.Tensor):
    return cuda_kernels() if t.is_cuda else None


def forward_weight(
    ctx, layer: FrozenQuantized, dtype: torch.dtype, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight a frozen matmul's forward multiplies by, dequantized (into the layer's workspace if it has one),
    with `row_scale` each output row times it (`FrozenQuantized.scaled_weight`).

    Inside a checkpointed block (`attached(..., checkpointed=...)`) the weight goes to the buffer of the layer's
    place in the block, and the caller saves it for backward (`ctx.shared`): checkpointing drops it after the
    forward, and the recompute saves it again, so the backward multiplies by the recompute's weight instead of
    dequantizing a third time. One block's weights are kept, a block at a time."""
    ctx.layer = layer
    workspace = layer.workspace
    ctx.shared = workspace is not None and layer.checkpoint_slot is not None and ctx.needs_input_grad[0]
    if ctx.shared:
        workspace = workspace.writing_to(f"checkpointed.{layer.checkpoint_slot}")
    return layer.dequantize(dtype, workspace) if row_scale is None else layer.scaled_weight(row_scale, dtype, workspace)


def backward_weight(
    ctx, dtype: torch.dtype, saved: torch.Tensor | None, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight for the backward: the one `forward_weight` gave if it was `saved` (ctx.shared), else again."""
    layer = ctx.layer
    if ctx.shared:
        return saved
    if row_scale is None:
        return layer.dequantize(dtype, layer.workspace)
    return layer.scaled_weight(row_scale, dtype, layer.workspace)


class _FrozenMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FrozenQuantized, rows: torch.Tensor | None = None):
        kernels = _kernels_for(x) if layer.has_kernels else None
        if rows is None and kernels is not None and x.numel() <= kernels.GEMV_MAX_ROWS * layer.in_features:
            ctx.layer, ctx.shared = layer, False
            return kernels.gemv(x, layer)  # decoding: never writes the weight
        weight = forward_weight(ctx, layer, x.dtype)
        if ctx.shared:
            ctx.save_for_backward(weight)
        if rows is None:
            return F.linear(x, weight)
        # (DoRA's row norms need rows·Wᵀ for a few constant rows: from the same dequantized weight, no gradient)
        extra = F.linear(rows.to(x.dtype), weight)
        ctx.mark_non_differentiable(extra)
        return F.linear(x, weight), extra

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        weight = backward_weight(ctx, grad.dtype, ctx.saved_tensors[0] if ctx.shared else None)
        return grad @ weight.to(grad.dtype), None, None


class _ConstantsMatmul(torch.autograd.Function):
    """x @ W'.T for an INT-k layer whose group constants train: W' = codes·scale·(1 + gamma) + offset +
    scale·delta. Like _FrozenMatmul it keeps no weight between forward and backward; gamma's and delta's
    gradients come from the weight gradient gᵀx summed over each group (times the codes for gamma)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: IntLinear, gamma, delta) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, gamma, delta)
        return F.linear(x, layer.adjusted_weight(x.dtype, gamma, delta, layer.workspace))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gamma, delta = ctx.saved_tensors
        layer: IntLinear = ctx.layer
        grad_x = grad @ layer.adjusted_weight(grad.dtype, gamma, delta, layer.workspace)
        grad_gamma = grad_delta = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            out_features, groups = layer.scale.shape
            grad_w = grad.reshape(-1, out_features).float().T @ x.reshape(-1, layer.in_features).float()
            grad_w = grad_w.view(out_features, groups, layer.group_size)
            scale = layer.scale.float()
            if ctx.needs_input_grad[3]:
                grad_delta = grad_w.sum(dim=2) * scale
            if ctx.needs_input_grad[2]:
                codes = layer.codes().view(out_features, groups, layer.group_size).float()
                grad_gamma = (grad_w * codes).sum(dim=2) * scale
        return grad_x, None, grad_gamma, grad_delta


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a frozen layer multiplies in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FrozenQuantized(nn.Module):
    """What every frozen quantized layer shares: forward through the dequantize-again matmul, and its size.

    `workspace`: None (each dequantization allocates), or a Workspace lent by whoever trains
    (`workspace.attached`) whose buffers the matmul dequantizes into.
    """

    in_features: int
    out_features: int
    bias: nn.Parameter | None
    workspace: Workspace | None
    checkpoint_slot: int | None = None  # the layer's place in its checkpointed block (see _FrozenMatmul)
    has_kernels = False  # whether quant/kernels.py computes this layer on CUDA

    def dequantize(self, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None) -> torch.Tensor:
        """The weight, (out, in), in `dtype`: a fresh tensor, or a view of a workspace buffer."""
        raise NotImplementedError

    def scaled_weight(
        self, row_scale: torch.Tensor, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """The weight with each output row o times `row_scale[o]` (DoRA's k), (out, in) in `dtype`: dequantized,
        then scaled in place (a dequantization is always a fresh tensor or a workspace buffer), the products formed
        with k as it is (fp32) and rounded once, as IntLinear's constants give them: DoRA's magnitude gradient
        divides by that k."""
        return self.dequantize(dtype, workspace).mul_(row_scale[:, None])

    def few_rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """x @ Wᵀ in fp32 without forming the weight, for a few rows on a CPU (quant/native.c) where that beats
        dequantizing for a matmul in `dtype`; None where the layer's format or the input does not allow it."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = matmul_dtype(x)
        # decoding a token at a time (no gradient): multiply by the codes in C instead of dequantizing first
        y = None if torch.is_grad_enabled() else self.few_rows(x, dtype)
        y = _FrozenMatmul.apply(x.to(dtype), self) if y is None else y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def forward_with_rows(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(x), rows·Wᵀ without bias or gradient), the weight dequantized once for both."""
        dtype = matmul_dtype(x)
        y, extra = _FrozenMatmul.apply(x.to(dtype), self, rows)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype), extra

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """The codes and constants by name (the bias, a plain weight, is not among them)."""
        return {n: p for n, p in self.named_parameters(recurse=False) if n != "bias"}

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.quantized_tensors().values())

    def _frozen(self, name: str, tensor: torch.Tensor | None) -> None:
        self.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))

    def _frozen_bias(self, bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.workspace = None


def quantized_tensor_ids(model: nn.Module) -> set[int]:
    """The ids of the codes and constants of every quantized layer in `model`: they are kept exactly as stored
    (never cast to another dtype) and stand for a weight rather than being one."""
    return {id(t) for m in model.modules() if isinstance(m, FrozenQuantized) for t in m.quantized_tensors().values()}


class NF4Linear(FrozenQuantized):
    """A frozen linear layer stored as NF4 (or FP4) codes with optionally double-quantized block constants."""

    has_kernels = True

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.blocksize, self.quant_type, self.weight_dtype = state.blocksize, state.quant_type, state.dtype
        out_features, in_features = self.out_features, self.in_features
        # Rows first where a row holds whole bytes and whole blocks; otherwise bitsandbytes' flat layout
        # (a block may then straddle two rows, and FSDP shards the flat tensor instead).
        self._frozen("packed", packed.reshape(out_features, -1) if in_features % 2 == 0 else packed.reshape(-1, 1))
        per_row = in_features // self.blocksize if in_features % self.blocksize == 0 else None
        self._frozen("absmax", state.absmax.reshape(out_features, per_row) if per_row else state.absmax.reshape(-1))
        self._frozen("offset", None if state.offset is None else state.offset.reshape(1))  # fully_shard: no 0-d
        self._frozen("nested_absmax", state.nested_absmax)
        self._frozen_bias(bias)

    def state(self) -> NF4State:
        """The flat constants, as bitsandbytes lays them out (nf4.py computes with these)."""
        return NF4State(
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.blocksize,
            self.quant_type,
            self.absmax.reshape(-1),
            self.offset,
            self.nested_absmax,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None) -> torch.Tensor:
        kernels = _kernels_for(self.packed)
        if kernels is not None:
            out = output(workspace, self.in_features * self.out_features, dtype, self.packed.device)
            return kernels.nf4_dequantize(self.packed, self.state(), dtype, out)
        return dequantize_4bit(self.packed, self.state(), dtype, workspace)

    def few_rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if not native.gemv_usable(x, dtype, self.in_features, self.blocksize):
            return None
        state = self.state()
        code = code_4bit(self.quant_type)
        return native.nf4_gemv(x, self.packed, state.block_absmax(), code, self.blocksize, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.quant_type}, blocksize={self.blocksize}"


class IntLinear(FrozenQuantized):
    """A frozen linear layer stored as group-wise INT-k codes with an fp16 scale and offset per group.

    w[o, j] = codes[o, j]·scale[o, g] + offset[o, g] with g = j // group_size. The offsets are where a
    QA-LoRA adapter merges (`add_to_offsets`), which leaves the codes and the storage format unchanged.
    """

    has_kernels = True

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scale.shape[1]
        check_bits_and_group(bits, self.group_size, self.in_features)
        if scale.shape != offset.shape or scale.shape[0] != self.out_features:
            shapes = f"scale {tuple(scale.shape)}, offset {tuple(offset.shape)}, codes {tuple(codes.shape)}"
            raise ValueError(f"{shapes} do not fit together")
        self.bits = bits
        self._frozen("packed", pack_rows(codes, bits))
        self._frozen("scale", scale.detach().half().contiguous())
        self._frozen("offset", offset.detach().half().contiguous())
        self._frozen_bias(bias)

    def codes(self) -> torch.Tensor:
        """The k-bit codes, uint8 (out, in)."""
        n = self.out_features * self.in_features
        return unpack_codes(self.packed, self.bits, n).view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None) -> torch.Tensor:
        return self._dequantize(self.scale, self.offset, dtype, workspace)

    def scaled_weight(
        self, row_scale: torch.Tensor, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """The rows' factor goes into each group's constants, k·(codes·scale + offset) = codes·(k·scale) + k·offset:
        the weight comes out scaled, with no pass of its own over it."""
        k = row_scale.float()[:, None]  # (fp16 constants times fp32 factors: fp32 products)
        return self._dequantize(self.scale * k, self.offset * k, dtype, workspace)

    def few_rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if self.bits != 4 or not native.gemv_usable(x, dtype, self.in_features, self.group_size):
            return None
        return native.int4_gemv(x, self.packed, self.scale, self.offset, self.group_size, self.out_features)

    def _dequantize(self, scale, offset, dtype, workspace) -> torch.Tensor:
        kernels = _kernels_for(self.packed)
        if kernels is not None:
            out = output(workspace, self.in_features * self.out_features, dtype, self.packed.device)
            return kernels.int_dequantize(self.packed, self.bits, scale, offset, dtype, out)
        return dequantize_packed(self.packed, self.bits, scale, offset, dtype, workspace)

    def adjusted_constants(
        self, gamma: torch.Tensor | None, delta: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (scale·(1 + gamma), offset + scale·delta): the group constants with trained changes."""
        scale, offset = self.scale.float(), self.offset.float()
        new_offset = offset if delta is None else offset + scale * delta.detach().float()
        new_scale = scale if gamma is None else scale * (1 + gamma.detach().float())
        return new_scale, new_offset

    def adjusted_weight(self, dtype, gamma, delta, workspace: Workspace | None = None) -> torch.Tensor:
        scale, offset = self.adjusted_constants(gamma, delta)
        return self._dequantize(scale, offset, dtype, workspace)

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor | None = None, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """With `gamma` / `delta` (trained group-constant changes, see LoraAdapter) the layer computes with
        scale·(1 + gamma) and offset + scale·delta, and passes their gradients back."""
        if gamma is None and delta is None:
            return super().forward(x)
        dtype = matmul_dtype(x)
        y = _ConstantsMatmul.apply(x.to(dtype), self, gamma, delta)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    @torch.no_grad()
    def add_to_offsets(self, delta: torch.Tensor) -> None:
        """offset[o, g] += delta[o, g] (computed in fp32, stored fp16): the exact QA-LoRA merge."""
        if delta.shape != self.offset.shape:
            raise ValueError(f"offset delta has shape {tuple(delta.shape)}, expected {tuple(self.offset.shape)}")
        self.offset.copy_((self.offset.float() + delta.float().to(self.offset.device)).half())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int{self.bits}, group_size={self.group_size}"


class GgufLinear(FrozenQuantized):
    """A frozen linear layer stored as a GGUF file's own blocks, in any type of formats/gguf_blocks.py (Q4_0 ...
    Q6_K), dequantized on every use with the gguf package's arithmetic (bit for bit). The blocks are kept as
    the file holds them, so the layer writes back as the same tensor; a merge changes the constants (or, for
    types without offsets, the codes) through its scheme (quant/schemes/gguf.py)."""

    def __init__(self, blocks: torch.Tensor, type_name: str, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        kind = gguf_blocks.TYPES[type_name]
        if in_features % kind.block or blocks.shape[1] != in_features // kind.block * kind.nbytes:
            raise ValueError(f"{type_name} blocks {tuple(blocks.shape)} do not hold rows of {in_features} weights")
        self.out_features, self.in_features, self.type_name = blocks.shape[0], in_features, type_name
        self._frozen("blocks", blocks.contiguous())
        self._frozen_bias(bias)

    def dequantize(self, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None) -> torch.Tensor:
        return gguf_blocks.dequantize(self.blocks, self.type_name).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.type_name}"
