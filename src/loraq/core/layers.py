"""What counts as a linear layer, and swapping one module for another.

Two kinds of full-precision layer take an adapter or get quantized: `nn.Linear` (weight (out, in)) and the
`Conv1D` of GPT-2-family models in transformers (weight (in, out): PEFT's `fan_in_fan_out`). Everything else
asks these functions for a layer's shape and weight in the (out, in) orientation, so that Conv1D is handled
here once.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, DistilGPT-2, ...): a linear layer storing its weight transposed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_plain_linear(module: nn.Module) -> bool:
    """A full-precision linear layer: nn.Linear or a Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer of any kind."""
    if is_conv1d(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return int(module.out_features), int(module.in_features)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A full-precision layer's weight as (out, in): a view (transposed for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


def quantizable_linear_names(model: nn.Module) -> list[str]:
    """Every full-precision linear layer except the output head: the layers a quantization scheme replaces."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if is_plain_linear(m) and m is not head]


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
