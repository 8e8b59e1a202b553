"""Frozen 4-bit linear layers: they hold only packed codes and constants, and dequantize on every use.

The matmul is an autograd.Function that dequantizes again in backward instead of saving the full-precision
weight, and returns no gradient for it: gradients flow to the input (and so to adapters below) only.
Nothing is cached between calls, so no inference call can change how a later training call behaves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraqError
from .intk import (
    check_bits_and_group,
    dequantize_packed,
    pack_codes,
    quantize_gptq,
    quantize_rtn,
    relative_error,
    unpack_codes,
)
from .nf4 import NF4State, dequantize_4bit, quantize_4bit


class _FrozenMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _FrozenQuantized) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype, reuse_buffers=True))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype, reuse_buffers=True), None


def compute_dtype_for(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a frozen quantized layer multiplies in: its own setting, else autocast's, else the input's."""
    if compute_dtype is not None:
        return compute_dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FrozenQuantized(nn.Module):
    """What the frozen 4-bit layers share: forward through the dequantize-again matmul, and their size."""

    compute_dtype: torch.dtype | None
    bias: nn.Parameter | None

    def dequantize(self, dtype: torch.dtype = torch.float32, reuse_buffers: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x, self.compute_dtype)
        y = _FrozenMatmul.apply(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class NF4Linear(_FrozenQuantized):
    """A frozen linear layer stored as NF4 (or FP4) with optionally double-quantized block constants.

    `compute_dtype` (None: follow autocast, else the input's dtype) is the dtype the weight is dequantized
    to; the output is returned in the input's dtype, as bitsandbytes' Linear4bit does.
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.blocksize, self.quant_type, self.weight_dtype = state.blocksize, state.quant_type, state.dtype
        self.compute_dtype: torch.dtype | None = None
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("offset", state.offset)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def quantize(
        cls, linear: nn.Linear, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
    ) -> NF4Linear:
        """A frozen 4-bit copy of `linear`."""
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant)
        return cls(packed, state, linear.bias)

    def state(self) -> NF4State:
        return NF4State(
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.blocksize,
            self.quant_type,
            self.absmax,
            self.offset,
            self.nested_absmax,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32, reuse_buffers: bool = False) -> torch.Tensor:
        """The weight, (out, in), in `dtype`; a fresh tensor each call (a shared work buffer with
        `reuse_buffers`, which only the frozen matmul uses)."""
        return dequantize_4bit(self.packed, self.state(), dtype, reuse_buffers)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.quant_type}, blocksize={self.blocksize}"


class IntLinear(_FrozenQuantized):
    """A frozen linear layer stored as group-wise INT-k codes with an fp16 scale and offset per group.

    w[o, j] = codes[o, j]·scale[o, g] + offset[o, g] with g = j // group_size. The offsets are where a
    QA-LoRA adapter merges (`add_to_offsets`), which leaves the codes and the storage format unchanged.
    """

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
        self.compute_dtype: torch.dtype | None = None
        self.register_buffer("packed", pack_codes(codes, bits))
        self.register_buffer("scale", scale.detach().half().contiguous())
        self.register_buffer("offset", offset.detach().half().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def codes(self) -> torch.Tensor:
        """The k-bit codes, uint8 (out, in)."""
        n = self.out_features * self.in_features
        return unpack_codes(self.packed, self.bits, n).view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32, reuse_buffers: bool = False) -> torch.Tensor:
        """The weight, (out, in), in `dtype`; a fresh tensor each call (a shared work buffer with
        `reuse_buffers`, which only the frozen matmul uses)."""
        return dequantize_packed(self.packed, self.bits, self.scale, self.offset, dtype, reuse_buffers)

    @torch.no_grad()
    def add_to_offsets(self, delta: torch.Tensor) -> None:
        """offset[o, g] += delta[o, g] (computed in fp32, stored fp16): the exact QA-LoRA merge."""
        if delta.shape != self.offset.shape:
            raise ValueError(f"offset delta has shape {tuple(delta.shape)}, expected {tuple(self.offset.shape)}")
        self.offset.copy_((self.offset.float() + delta.float().to(self.offset.device)).half())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int{self.bits}, group_size={self.group_size}"


QuantizeLayer = Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module]


def nf4_layers(blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True) -> QuantizeLayer:
    """A `quantize_layer` function making frozen NF4Linear layers (for `load_model` / `quantize_linears`)."""

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        packed, state = quantize_4bit(weight, blocksize, quant_type, double_quant)
        return NF4Linear(packed, state, bias)

    return make


def _check_layer(bits: int, group_size: int, in_features: int, name: str) -> None:
    """`check_bits_and_group` as a user error naming the option and the layer."""
    try:
        check_bits_and_group(bits, group_size, in_features, f" of layer {name}")
    except ValueError as e:
        raise LoraqError(f"{'--bits' if 'bits must' in str(e) else '--group-size'}: {e}") from None


def int_layers(bits: int = 4, group_size: int = 32) -> QuantizeLayer:
    """A `quantize_layer` function making frozen round-to-nearest IntLinear layers."""

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        _check_layer(bits, group_size, weight.shape[1], name)
        return IntLinear(*quantize_rtn(weight, bits, group_size), bits, bias)

    return make


def quantize_linears(model: nn.Module, quantize_layer: QuantizeLayer) -> nn.Module:
    """Replace every linear layer except the output head by `quantize_layer(name, weight, bias)`, one at a
    time, releasing each full-precision weight as its layer is replaced; freeze all parameters."""
    names = quantizable_linear_names(model)
    if not names:
        raise LoraqError("quantize: the model has no linear layers besides the output head")
    for name in names:
        layer = model.get_submodule(name)
        new = quantize_layer(name, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
        replace_module(model, name, new.to(layer.weight.device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantize_model(
    model: nn.Module, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> nn.Module:
    """Replace every linear layer except the output head by a frozen NF4Linear, one layer at a time.

    Adapt after quantizing, as QLoRA does. To avoid holding the full-precision model at all, quantize
    while loading instead: `load_model(name, quantize_layer=nf4_layers())`.
    """
    return quantize_linears(model, nf4_layers(blocksize, quant_type, double_quant))


QUANTIZERS = ("rtn", "gptq")


def quantizable_linear_names(model: nn.Module) -> list[str]:
    """Every plain nn.Linear except the output head: the layers the quantizers replace."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def quantize_model_int(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 32,
    quantizer: str = "rtn",
    hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Replace every linear layer except the output head by a frozen IntLinear, one layer at a time.

    Args:
        quantizer: "rtn" (round to nearest) or "gptq" (needs `hessians`, see `collect_hessians`).

    Returns:
        The relative reconstruction error ||W - Ŵ||/||W|| of each layer, by name.

    Raises:
        LoraqError: bad bits or quantizer, or a group size that does not divide a layer's input size
            (checked for every layer before any is replaced).
    """
    if quantizer not in QUANTIZERS:
        raise LoraqError(f"--quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    if quantizer == "gptq" and not hessians:
        raise LoraqError("the gptq quantizer needs calibration statistics (collect_hessians)")
    for name in quantizable_linear_names(model):
        _check_layer(bits, group_size, model.get_submodule(name).in_features, name)
    errors: dict[str, float] = {}

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        w = weight.float().cpu()
        if quantizer == "gptq":
            layer = IntLinear(*quantize_gptq(w, hessians[name], bits, group_size), bits, bias)
        else:
            layer = IntLinear(*quantize_rtn(w, bits, group_size), bits, bias)
        errors[name] = relative_error(w, layer.dequantize())
        return layer

    quantize_linears(model, make)
    return errors


@torch.no_grad()
def collect_hessians(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Σ xᵀx of the inputs of every quantizable linear layer over `batches` (dicts with input_ids and
    attention_mask); padded positions are left out. All layers are measured in one pass of the
    full-precision model."""
    names = quantizable_linear_names(model)
    sums = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features) for n in names}
    mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(module, args, output) -> None:
            x = args[0].detach().float()
            x = x[mask[0].bool()] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            sums[name] += (x.T @ x).cpu()

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"]]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return sums


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every frozen quantized layer by a plain nn.Linear holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _FrozenQuantized):
            replace_module(model, name, plain_linear(module.dequantize(torch.float32), module.bias, dtype))
    return model


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (out, in) and `bias`, in `dtype`, on the weight's device."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.to(dtype).requires_grad_(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` of `model` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
