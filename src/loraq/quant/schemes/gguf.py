"""A GGUF's own Q4_1 codes as the INT4 g32 base: no re-quantization. Q4_1 is IntLinear's layout at 4 bits
and groups of 32 (d = scale, m = offset), so every layer the file stores as Q4_1 is taken as it is (q/k rows
un-permuted, formats/gguf.py); a layer stored in another type is re-quantized with RTN INT4 g32 from the
loaded weights, with a note saying so."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from ...errors import LoraqError
from ...formats.gguf import Q4_1Layers
from ..frozen import IntLinear
from .intk import IntRTN


class GgufCodes(IntRTN):
    name = "gguf"

    def __init__(self, source: str | os.PathLike):
        super().__init__(4, 32)
        self.source = Path(source)
        self._layers: Q4_1Layers | None = None
        self.requantized: list[str] = []

    def describe(self) -> str:
        return f"the INT4 g32 codes stored in {self.source.name}"

    def quantize_layer(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if self._layers is None:  # opened on first use: resolving a scheme reads nothing
            self._layers, self.requantized = Q4_1Layers(self.source), []
        stored = self._layers.get(name)
        if isinstance(stored, tuple):
            codes, d, m = stored
            if codes.shape != weight.shape:
                raise LoraqError(
                    f"{self.source}: layer {name} is {tuple(codes.shape)}, the model expects {tuple(weight.shape)}"
                )
            return IntLinear(codes.to(weight.device), d.to(weight.device), m.to(weight.device), 4, bias)
        self.requantized.append(f"{name} ({stored or 'absent'})")
        if len(self.requantized) == 1:
            print(
                f"loraq: note: {self.source} stores {self.requantized[0]} not as Q4_1; such layers are dequantized "
                "and re-quantized with RTN INT4 g32 (a second rounding)",
                file=sys.stderr,
            )
        return super().quantize_layer(name, weight, bias)
