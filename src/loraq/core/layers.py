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


# Frozen weights kept in their file's 16 bits, computed in fp32 on a CPU. A 7B model's embedding and output head
# are 0.8 GB each in fp32 and half that as their safetensors store them; fp32 copies hold no more information.
VOCAB_CHUNK = 8192  # rows of a 16-bit head cast at a time: (8192 x hidden) fp32, 128 MiB at hidden 4096


class Stored16Linear(nn.Linear):
    """A frozen linear layer (the output head) whose weight stays in 16 bits while its input may be fp32: the
    weight is cast `VOCAB_CHUNK` rows at a time, in forward and again in backward, so the output is the fp32
    product exactly and no fp32 copy of the weight is ever made whole or kept for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return rows_linear(x, self.weight, self.bias)


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in x's dtype with `weight` cast `VOCAB_CHUNK` rows at a time; differentiable
    in x (the weight and bias are frozen: backward casts the rows again rather than keeping the casts)."""
    return _RowsLinear.apply(x, weight.detach(), None if bias is None else bias.detach())


class _RowsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        if out.numel() == 0:  # transformers asks the head for no rows when the loss computes its own logits
            return out
        for start in range(0, weight.shape[0], VOCAB_CHUNK):
            rows = slice(start, start + VOCAB_CHUNK)
            b = None if bias is None else bias[rows].to(x.dtype)
            out[..., rows] = nn.functional.linear(x, weight[rows].to(x.dtype), b)
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        return times_rows(flat, weight).view(*grad.shape[:-1], weight.shape[1]), None, None


def times_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (n, V) @ weight (V, H) in x's dtype, the weight cast `VOCAB_CHUNK` rows at a time."""
    if weight.dtype == x.dtype:
        return x @ weight
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        rows = slice(start, start + VOCAB_CHUNK)
        out.addmm_(x[:, rows], weight[rows].to(x.dtype))
    return out


def _upcast_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    dtype = module.loraq_compute_dtype
    return output.to(dtype) if output.is_floating_point() and output.dtype != dtype else output


def keep_16bit_embeddings(model: nn.Module) -> bool:
    """Let a model whose input embedding (and plain nn.Linear head, tied or not) hold 16-bit weights compute in
    fp32: the embedding's output is cast to fp32 (a forward hook, so scaled embeddings such as Gemma's keep their
    own forward), the head becomes a `Stored16Linear`. Returns False, changing nothing, where that does not hold
    (the caller then keeps fp32 copies)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embedding is None or embedding.weight.dtype not in (torch.float16, torch.bfloat16):
        return False
    if head is not None and (type(head) is not nn.Linear or head.weight.dtype != embedding.weight.dtype):
        return False
    embedding.loraq_compute_dtype = torch.float32
    embedding.register_forward_hook(_upcast_output)
    if head is not None:
        head.__class__ = Stored16Linear  # same parameters, same state_dict keys; only forward differs
    return True


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """The dtype 16-bit stored embeddings hand on (fp32 on a CPU, the 16-bit compute dtype on a GPU)."""
    for module in model.modules():
        if hasattr(module, "loraq_compute_dtype"):
            module.loraq_compute_dtype = dtype
