"""Work buffers for dequantize-inside-a-matmul, and the table lookup that decodes packed codes into them.

Training dequantizes every frozen 4-bit layer twice per step (forward and backward). Freshly allocated
temporaries of a few MB each, freed in a different order every step, fragment the C heap: peak RSS grew by
~15% on the default model. A `Workspace` keeps one buffer per name, dtype and device and hands out views of
it instead. It belongs to whoever trains (`attached(model)` lends one to the model's frozen layers for the
length of a `with` block and frees it after): no module-level state, so two models, threads or processes
never share a buffer.

A view handed out is overwritten by the next request for the same name: only a caller that is done with it
before the next dequantization may use one (the frozen matmul's forward and backward are).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Workspace:
    """Named, reusable flat buffers, grown (never shrunk) as needed until `release`."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of `numel` elements, a view of the buffer `name` (overwritten by the next get)."""
        key = (name, torch.device(device), dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def release(self) -> None:
        self._buffers.clear()


@contextlib.contextmanager
def attached(model: nn.Module) -> Iterator[Workspace]:
    """Lend one new Workspace to every frozen quantized layer of `model` inside the block; free it after."""
    layers = [m for m in model.modules() if hasattr(m, "workspace")]
    workspace = Workspace()
    for layer in layers:
        layer.workspace = workspace
    try:
        yield workspace
    finally:
        for layer in layers:
            layer.workspace = None
        workspace.release()


def word_table(byte_table: torch.Tensor) -> torch.Tensor:
    """(65536, 2k) from a (256, k) byte table: row w + 32768 holds the values of the two bytes whose
    little-endian int16 is w, so that one lookup decodes two bytes."""
    unsigned = (torch.arange(65536, device=byte_table.device) - 32768) & 0xFFFF
    return torch.cat([byte_table[unsigned & 255], byte_table[unsigned >> 8]], dim=1).contiguous()


def lookup(
    packed: torch.Tensor, byte_table: torch.Tensor, words: torch.Tensor, workspace: Workspace | None = None
) -> torch.Tensor:
    """The fp32 values the packed bytes stand for, flat, in stream order.

    `byte_table` (256, k) and its `word_table` (65536, 2k): two bytes are read as one int16 and decoded at
    once when the byte count is even on a little-endian machine. With a workspace the index and the result
    live in its buffers.
    """
    flat = packed.reshape(-1)
    if flat.numel() % 2 == 0 and sys.byteorder == "little":
        keys, table, shift = flat.view(torch.int16), words, 32768
    else:
        keys, table, shift = flat, byte_table, 0
    if workspace is None:
        return F.embedding(keys.int().add_(shift), table).view(-1)
    index = workspace.get("dequantize.index", keys.numel(), torch.int32, packed.device).copy_(keys).add_(shift)
    values = workspace.get("dequantize.values", index.numel() * table.shape[1], torch.float32, packed.device)
    torch.index_select(table, 0, index, out=values.view(-1, table.shape[1]))
    return values


def cast(values: torch.Tensor, dtype: torch.dtype, workspace: Workspace | None = None) -> torch.Tensor:
    """`values.to(dtype)`, into a workspace buffer when one is given."""
    if values.dtype == dtype:
        return values
    if workspace is None:
        return values.to(dtype)
    return workspace.get("dequantize.cast", values.numel(), dtype, values.device).view(values.shape).copy_(values)
