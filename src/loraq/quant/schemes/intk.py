"""Group-wise INT-k (k = 2, 3, 4, 8), fp16 scale and offset per group of input columns, quantized by
round-to-nearest: QA-LoRA's base. A QA-LoRA adapter pooling the same groups merges exactly into the
offsets. At 4 bits and groups of 32 this is GGUF Q4_1's layout, so such a base exports to GGUF exactly.
Checkpoint keys per layer: `qweight` (uint8, the packed codes), `scales` and `offsets` (fp16, (out, groups))."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import LoraqError
from ..frozen import IntLinear
from ..intk import BITS, check_bits_and_group, packed_bytes, quantize_rtn
from .base import CorruptTensor, Scheme, TakeTensor


class IntRTN(Scheme):
    name = "rtn"
    layer_type = IntLinear
    trainable_constants = True

    def __init__(self, bits: int = 4, group_size: int = 32):
        self.bits, self.group_size = bits, group_size
        self.pool_window = group_size

    @classmethod
    def of_layer(cls, layer: nn.Module) -> Scheme | None:
        return IntRTN(layer.bits, layer.group_size) if isinstance(layer, IntLinear) else None

    def describe(self) -> str:
        return f"INT{self.bits} g{self.group_size}"

    @property
    def storage(self) -> str:
        return f"INT{self.bits} g{self.group_size}"

    @property
    def exact_exports(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("checkpoint", "gguf") if (self.bits, self.group_size) == (4, 32) else ("checkpoint",)

    def bits_per_param(self, in_features: int) -> float:
        return self.bits + 32 / self.group_size  # fp16 scale and offset per group

    def check(self, name: str, shape: tuple[int, int]) -> None:
        try:
            check_bits_and_group(self.bits, self.group_size, shape[1], f" of layer {name}")
        except ValueError as e:
            raise LoraqError(f"{'--bits' if 'bits must' in str(e) else '--group-size'}: {e}") from None

    def quantize_layer(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, statistic=None) -> nn.Module:
        self.check(name, tuple(weight.shape))
        return IntLinear(*quantize_rtn(weight, self.bits, self.group_size), self.bits, bias)

    def merges_in_format(self, pool: int) -> bool:
        return pool == self.group_size  # the pooled update is constant inside each group: an offset change

    @torch.no_grad()
    def merge(self, layer: nn.Module, adapter: nn.Module, sign: float = 1.0) -> None:
        """Into the group constants: offset += the pooled update (constant inside each group); trained
        constants replace scale and offset. Codes never change; exact up to the fp16 rounding of the
        stored constants (unmerging undoes it to that rounding too)."""
        if not self.merges_in_format(adapter.pool):
            super().merge(layer, adapter, sign)
        lowrank = adapter.group_delta().to(layer.offset.device) if adapter.r else 0.0
        if not adapter.trains_constants:
            layer.add_to_offsets(sign * lowrank)
            return
        if sign > 0:
            scale, offset = layer.adjusted_constants(adapter.gamma, adapter.delta)
            offset = offset + lowrank
        else:  # scale' = scale·(1 + gamma), offset' = offset + scale·delta + update: solved for scale, offset
            scale = layer.scale.float()
            if adapter.gamma is not None:
                scale = scale / (1 + adapter.gamma.detach().float())
            offset = layer.offset.float() - lowrank
            if adapter.delta is not None:
                offset = offset - scale * adapter.delta.detach().float()
        layer.scale.copy_(scale.half())
        layer.offset.copy_(offset.half())

    def checkpoint_config(self) -> dict:
        return {"quant_method": "loraq", "format": "int", "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_checkpoint_config(cls, config: dict) -> Scheme | None:
        if config.get("quant_method") != "loraq" or config.get("format") != "int":
            return None
        bits, group_size = config.get("bits"), config.get("group_size")
        if bits not in BITS or not isinstance(group_size, int) or group_size < 2:
            raise LoraqError(f"quantization_config names INT{bits} g{group_size}, which loraq cannot read")
        return cls(bits, group_size)

    def checkpoint_tensors(self, layer: IntLinear) -> dict[str, torch.Tensor]:
        return {"qweight": layer.packed.reshape(-1), "scales": layer.scale, "offsets": layer.offset}

    def layer_from_checkpoint(
        self, take: TakeTensor, keys: list[str], shape: tuple[int, int], bias: torch.Tensor | None
    ) -> nn.Module:
        out_features, in_features = shape
        groups = in_features // self.group_size
        packed = take("qweight", torch.uint8, packed_bytes(out_features * in_features, self.bits))
        scale = take("scales", torch.float16, out_features * groups).view(out_features, groups)
        offset = take("offsets", torch.float16, out_features * groups).view(out_features, groups)
        for key, t in (("scales", scale), ("offsets", offset)):
            if not torch.isfinite(t).all():
                raise CorruptTensor(key, "holds NaN or infinite values")
        layer = IntLinear(torch.zeros(out_features, in_features, dtype=torch.uint8), scale, offset, self.bits, bias)
        layer._frozen("packed", packed.view_as(layer.packed))  # the checkpoint's own tensor (a mapped file's view)
        return layer
