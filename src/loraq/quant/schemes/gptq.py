"""GPTQ INT-k: the same layers and checkpoint as round-to-nearest INT-k (intk.py), quantized with error
feedback calibrated on the layers' inputs (quant/gptq.py), so it needs calibration data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...core.layers import layer_shape, linear_weight, quantizable_linear_names, replace_module
from ...errors import LoraqError
from ..frozen import IntLinear
from ..gptq import collect_hessians, quantize_gptq
from ..intk import relative_error
from .intk import IntRTN


class IntGPTQ(IntRTN):
    name = "gptq"
    needs_calibration = True

    def describe(self) -> str:
        return f"GPTQ INT{self.bits} g{self.group_size}"

    def quantize_layer(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        raise LoraqError(
            "--quantizer gptq needs calibration data; quantize the model with "
            "loraq.quantize(model, config, calibration=batches) (batches of input_ids and attention_mask)"
        )

    def quantize_model(self, model: nn.Module, calibration: Iterable[dict] | None = None) -> dict[str, float]:
        if calibration is None:
            self.quantize_layer("", torch.empty(0, 0), None)  # raises, naming the function that takes data
        names = quantizable_linear_names(model)
        for name in names:
            self.check(name, layer_shape(model.get_submodule(name)))
        hessians = collect_hessians(model, names, calibration)
        if not any(float(h.diagonal().sum()) > 0 for h in hessians.values()):
            raise LoraqError("--quantizer gptq: the calibration data is empty (no unpadded token)")
        errors: dict[str, float] = {}
        for name in names:
            layer = model.get_submodule(name)
            weight = linear_weight(layer).detach().float()
            codes, scale, offset = quantize_gptq(weight, hessians.pop(name), self.bits, self.group_size)
            new = IntLinear(codes, scale, offset, self.bits, None if layer.bias is None else layer.bias.detach())
            errors[name] = relative_error(weight, new.dequantize())
            replace_module(model, name, new)
        for p in model.parameters():
            p.requires_grad_(False)
        return errors
