"""Frozen 4-bit linear layers: they hold only packed codes and constants, and dequantize on every use.

The matmul is an autograd.Function that dequantizes again in backward instead of saving the full-precision
weight, and returns no gradient for it: gradients flow to the input (and so to adapters below) only.
Nothing is cached between calls, so no inference call can change how a later training call behaves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraqError
from .nf4 import NF4State, dequantize_4bit, quantize_4bit


class _FrozenMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


def compute_dtype_for(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a frozen quantized layer multiplies in: its own setting, else autocast's, else the input's."""
    if compute_dtype is not None:
        return compute_dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class NF4Linear(nn.Module):
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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight, (out, in), in `dtype`; a fresh tensor each call."""
        return dequantize_4bit(self.packed, self.state(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x, self.compute_dtype)
        y = _FrozenMatmul.apply(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.quant_type}, blocksize={self.blocksize}"


def quantize_model(
    model: nn.Module, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> nn.Module:
    """Replace every linear layer except the output head by a frozen NF4Linear, one layer at a time.

    Each full-precision weight is released as soon as its layer is replaced, so peak memory is the
    full-precision model plus one layer being quantized. Layers already adapted must be quantized before
    adapters are attached (adapt after quantizing, as QLoRA does).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not names:
        raise LoraqError("quantize: the model has no linear layers besides the output head")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.quantize(getattr(parent, child), blocksize, quant_type, double_quant))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Set the dtype every frozen quantized layer of `model` multiplies in (None: follow autocast/input)."""
    for m in model.modules():
        if hasattr(m, "compute_dtype") and isinstance(m, nn.Module) and hasattr(m, "dequantize"):
            m.compute_dtype = dtype
