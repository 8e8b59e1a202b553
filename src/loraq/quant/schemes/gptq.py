"""GPTQ INT-k: the same layers and checkpoint as round-to-nearest INT-k (intk.py), quantized with error
feedback calibrated on the layers' inputs (quant/gptq.py), so it needs calibration data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...errors import LoraqError
from ..frozen import IntLinear
from ..gptq import collect_hessians, quantize_gptq
from .intk import IntRTN


class IntGPTQ(IntRTN):
    name = "gptq"
    needs_calibration = True

    def describe(self) -> str:
        return f"GPTQ INT{self.bits} g{self.group_size}"

    def quantize_layer(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, statistic: torch.Tensor | None = None
    ) -> nn.Module:
        if statistic is None:
            raise LoraqError(
                "--quantizer gptq needs calibration data; quantize the model with "
                "loraq.quantize(model, config, calibration=batches) (batches of input_ids and attention_mask)"
            )
        codes, scale, offset = quantize_gptq(weight.float(), statistic, self.bits, self.group_size)
        return IntLinear(codes, scale, offset, self.bits, bias)

    def calibrate(self, model: nn.Module, names: list[str], calibration: Iterable[dict] | None) -> dict:
        if calibration is None:
            self.quantize_layer("", torch.empty(0, 0), None)  # raises, naming the function that takes data
        hessians = collect_hessians(model, names, calibration)
        if not any(float(h.diagonal().sum()) > 0 for h in hessians.values()):
            raise LoraqError("--quantizer gptq: the calibration data is empty (no unpadded token)")
        return hessians
