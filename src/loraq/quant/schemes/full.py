"""Full precision: the base as loaded (nn.Linear, or GPT-2's Conv1D), for plain LoRA."""

from __future__ import annotations

import torch
from torch import nn

from ...core.layers import is_plain_linear, linear_weight
from .base import Scheme


class FullPrecision(Scheme):
    name = "none"
    layer_type = nn.Linear
    exact_exports = ("hf",)
    quantized = False

    @classmethod
    def of_layer(cls, layer: nn.Module) -> Scheme | None:
        return cls() if is_plain_linear(layer) else None

    def describe(self) -> str:
        return "full precision"

    def bits_per_param(self, in_features: int) -> float:
        return 32.0

    def quantize_layer(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, statistic=None) -> nn.Module:
        raise NotImplementedError("a full-precision base is not quantized")

    def quantize_model(self, model: nn.Module, calibration=None) -> dict[str, float]:
        return {}

    def merges_in_format(self, pool: int) -> bool:
        return True  # any adapter's full-width update adds into the weight (in fp32, then one rounding)

    @torch.no_grad()
    def merge(self, layer: nn.Module, adapter: nn.Module, sign: float = 1.0) -> None:
        weight = linear_weight(layer)
        delta = adapter.delta_weight().to(weight.device)
        weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return linear_weight(layer).detach().float()
