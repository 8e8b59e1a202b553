"""A GGUF file's own linear layers as the base, in the file's own block types: no re-quantization.

`GgufCodes` is the scheme QA-LoRA INT4 g32 round-to-nearest becomes on a model loaded from a GGUF: Q4_1 layers
become IntLinear (its layout at 4 bits, groups of 32), every other type of formats/gguf_blocks.py a GgufLinear
holding the file's blocks. `GgufBlocks` is the format of one such layer: a QA-LoRA adapter (pooling 32) merges
into it in the file's own type —

- Q4_1, Q5_1: exactly, into the fp16 offsets m;
- Q2_K, Q4_K, Q5_K: to the nearest offsets the type holds (integer mins times one fp16 dmin per super-block,
  fitted again);
- Q4_0, Q5_0, Q8_0, Q3_K, Q6_K (no offsets): by moving each sub-block's codes by the whole number of steps
  nearest to the update (clamped to the code range),

and merge_run reports the logit error of the written file against the trained model. Where the type cannot
hold every update exactly, training computes with the weights the merge will write (`written_weight`), the
gradient passed to the adapter as if they held its update (straight-through): the model trained and validated
is then the file written, and the adapter learns updates the type can hold.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from ...errors import LoraqError
from ...formats import gguf_blocks
from ...formats.gguf import GgufLayers, q4_1_decode
from ..frozen import GgufLinear, IntLinear
from .base import RowShard, Scheme
from .intk import IntRTN


class GgufBlocks(Scheme):
    name = "gguf-blocks"
    layer_type = GgufLinear
    exact_exports = ("gguf",)
    pool_window = 32

    def __init__(self, type_name: str = "Q4_0"):
        self.type_name = type_name
        self.kind = gguf_blocks.TYPES[type_name]
        self.exact_merge = self.kind.offsets == "free"
        # (trained group constants need a layer that computes with them: IntLinear, which Q4_1 files become, does)

    @classmethod
    def of_layer(cls, layer: nn.Module) -> Scheme | None:
        return cls(layer.type_name) if isinstance(layer, GgufLinear) else None

    def describe(self) -> str:
        return f"GGUF {self.type_name}"

    def bits_per_param(self, in_features: int) -> float:
        return self.kind.nbytes * 8 / self.kind.block

    def merges_in_format(self, pool: int) -> bool:
        return pool == self.pool_window

    @torch.no_grad()
    def merge(self, layer: nn.Module, adapter: nn.Module, sign: float = 1.0) -> None:
        if not self.merges_in_format(adapter.pool):
            super().merge(layer, adapter, sign)  # refuses
        layer.blocks.copy_(self.merged_blocks(layer.blocks, adapter, sign))

    def merge_rounds(self, adapter: nn.Module) -> bool:
        return not self.exact_merge and bool(adapter.r) and self.merges_in_format(adapter.pool)

    @torch.no_grad()
    def written_weight(self, layer: nn.Module, adapter: nn.Module) -> torch.Tensor | None:
        if not self.merge_rounds(adapter):
            return None
        return gguf_blocks.dequantize(self.merged_blocks(layer.blocks, adapter), self.type_name)

    def merged_blocks(self, blocks: torch.Tensor, adapter: nn.Module, sign: float = 1.0) -> torch.Tensor:
        """`blocks` with the adapter's update merged in the file's own type: what `merge` writes."""
        q, a, b = gguf_blocks.decode(blocks, self.type_name)
        per = adapter.pool // self.kind.sub  # sub-blocks per pooled group (1 or 2)
        update = adapter.group_delta().to(a.device).repeat_interleave(per, dim=1) * sign if adapter.r else 0.0
        if self.kind.offsets in ("free", "quantized"):  # fp16 offsets (exact to fp16), or a grid of mins
            return gguf_blocks.set_offsets(blocks, self.type_name, b + update)
        steps = torch.round(update / torch.where(a == 0, torch.ones_like(a), a)) * (a != 0)
        low, high = gguf_blocks.code_range(self.type_name)
        moved = q + steps.repeat_interleave(self.kind.sub, dim=1).to(torch.int16)
        return gguf_blocks.encode_codes(blocks, self.type_name, moved.clamp(low, high))


class GgufCodes(IntRTN):
    """INT4 g32 from a GGUF's own codes (see the module's docstring)."""

    name = "gguf"

    def __init__(self, source: str | os.PathLike):
        super().__init__(4, 32)
        self.source = Path(source)
        self._layers: GgufLayers | None = None
        self.requantized: list[str] = []

    def describe(self) -> str:
        return f"the codes stored in {self.source.name}"

    def layers(self) -> GgufLayers:
        """The file's linear layers, opened (and every tensor's type and shape checked) on first use."""
        if self._layers is None:
            self._layers = GgufLayers(self.source)
        return self._layers

    def quantize_layer(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, statistic=None) -> nn.Module:
        stored = self.layers().get(name)
        if stored is None:
            self.requantized.append(name)
            if len(self.requantized) == 1:
                print(
                    f"loraq: note: {self.source} has no tensor for {name}; such layers are quantized with RTN INT4 "
                    "g32 from the loaded weights",
                    file=sys.stderr,
                )
            return super().quantize_layer(name, weight, bias)
        type_name, blocks = stored
        kind = gguf_blocks.TYPES[type_name]
        rows, columns = blocks.shape[0], blocks.shape[1] // kind.nbytes * kind.block
        if (rows, columns) != tuple(weight.shape):
            raise LoraqError(
                f"{self.source}: layer {name} is {(rows, columns)} in the file, the model expects {tuple(weight.shape)}"
            )
        return _layer_from_blocks(blocks, type_name, columns, bias, weight.device)

    def quantize_rows(
        self, name: str, weight: torch.Tensor, shard: RowShard, like: nn.Module
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """The file's own blocks of these rows (one layer read at a time; no quantization at all)."""
        stored = self.layers().get(name)
        if stored is None:  # quantized from the weight's rows, as quantize_layer does
            return super().quantize_rows(name, weight, shard, like)
        type_name, blocks = stored
        if weight.shape[0] == 0:
            return {}, weight
        columns = weight.shape[1]
        layer = _layer_from_blocks(blocks[shard.start : shard.stop], type_name, columns, None, weight.device)
        return layer.quantized_tensors(), layer.dequantize()


def _layer_from_blocks(
    blocks: torch.Tensor, type_name: str, columns: int, bias: torch.Tensor | None, device: torch.device
) -> nn.Module:
    """Q4_1 blocks as an IntLinear (INT4 g32), any other type as a GgufLinear keeping them."""
    if type_name == "Q4_1":
        codes, d, m = q4_1_decode(blocks.numpy(), columns)
        return IntLinear(codes.to(device), d.to(device), m.to(device), 4, bias)
    return GgufLinear(blocks.to(device), type_name, columns, bias)
