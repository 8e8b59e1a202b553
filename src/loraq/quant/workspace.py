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
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Workspace:
    """Named, reusable flat buffers, grown (never shrunk) as needed until `release`. A dequantization writes
    its result into the buffer named `output` ("dequantize.out" unless `writing_to` says otherwise)."""

    def __init__(self, buffers: dict | None = None, output: str = "dequantize.out") -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {} if buffers is None else buffers
        self.output = output

    def writing_to(self, name: str) -> Workspace:
        """The same buffers, with dequantizations written into the buffer `name` instead."""
        return Workspace(self._buffers, name)

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
def attached(model: nn.Module, checkpointed: Iterable[nn.Module] = ()) -> Iterator[Workspace]:
    """Lend one new Workspace to every frozen quantized layer of `model` inside the block; free it after.

    `checkpointed`: the blocks gradient checkpointing recomputes, one by one. Their frozen layers then keep
    their dequantized weight from the recompute for the backward (each layer a buffer of its place in its block,
    so the buffers hold one block) instead of dequantizing it again.
    """
    layers = [m for m in model.modules() if hasattr(m, "workspace")]
    workspace = Workspace()
    for layer in layers:
        layer.workspace = workspace
    for block in checkpointed:
        for slot, layer in enumerate(m for m in block.modules() if hasattr(m, "checkpoint_slot")):
            layer.checkpoint_slot = slot
    try:
        yield workspace
    finally:
        for layer in layers:
            layer.workspace = None
            if hasattr(layer, "checkpoint_slot"):
                layer.checkpoint_slot = None
        workspace.release()


def output(workspace: Workspace | None, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where a dequantization of `numel` values writes: a view of the workspace's output buffer, or a fresh tensor."""
    if workspace is None:
        return torch.empty(numel, dtype=dtype, device=device)
    return workspace.get(workspace.output, numel, dtype, device)


def word_table(byte_table: torch.Tensor) -> torch.Tensor:
    """(65536, 2k) from a (256, k) byte table: row w + 32768 holds the values of the two bytes whose
    little-endian int16 is w, so that one lookup decodes two bytes."""
    unsigned = (torch.arange(65536, device=byte_table.device) - 32768) & 0xFFFF
    return torch.cat([byte_table[unsigned & 255], byte_table[unsigned >> 8]], dim=1).contiguous()


def lookup(
    packed: torch.Tensor,
    byte_table: torch.Tensor,
    words: torch.Tensor,
    workspace: Workspace | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fp32 values the packed bytes stand for, flat, in stream order.

    `byte_table` (256, k) and its `word_table` (65536, 2k): two bytes are read as one int16 and decoded at
    once when the byte count is even on a little-endian machine. With a workspace the index lives in its
    buffer and the values are written into `out` (fp32, room for k values per byte).
    """
    flat = packed.reshape(-1)
    if flat.numel() % 2 == 0 and sys.byteorder == "little" and flat.storage_offset() % 2 == 0:
        keys, table, shift = flat.view(torch.int16), words, 32768
    else:
        keys, table, shift = flat, byte_table, 0
    if workspace is None or out is None:
        return F.embedding(keys.int().add_(shift), table).view(-1)
    index = workspace.get("dequantize.index", keys.numel(), torch.int32, packed.device).copy_(keys).add_(shift)
    values = out[: index.numel() * table.shape[1]]
    torch.index_select(table, 0, index, out=values.view(-1, table.shape[1]))
    return values


def decoded(
    workspace: Workspace,
    numel: int,
    dtype: torch.dtype,
    device: torch.device,
    step: int,
    decode: Callable[[int, int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`numel` values in `dtype`, a view of the workspace's output buffer, from `decode(start, stop, buffer)`,
    which writes the fp32 values [start, stop) into `buffer` (room for 8 more) and returns them (a view of it).

    fp32 is decoded into the output at once. A 16-bit output on a CPU is decoded `step` values at a time
    through one fp32 buffer of that size, which stays in the CPU's cache: cast pass and fp32 weight-sized
    buffer both gone (1.2-1.5x faster, 180 MB less on a 7B layer). The float operations per value are the same.
    """
    out = workspace.get(workspace.output, numel + SLACK, dtype, device)
    if dtype == torch.float32 or device.type != "cpu":
        step = numel
    if dtype == torch.float32:
        decode(0, numel, out)
        return out[:numel]
    buffer = workspace.get("dequantize.values", min(step, numel) + SLACK, torch.float32, device)
    for start in range(0, numel, step):
        stop = min(numel, start + step)
        out[start:stop].copy_(decode(start, stop, buffer))
    return out[:numel]


SLACK = 8  # values a decode may write past its stop: the rest of its last byte (or byte pair)
# values per piece of a 16-bit dequantization on a CPU (1 MB of fp32): a multiple of every NF4 block size
PIECE = 1 << 18
