"""Table lookup of packed codes, and the work buffers reused by every dequantize-inside-a-matmul, so that
training does not allocate and free a full-precision weight per layer per step. Freshly allocated
temporaries of a few MB each, freed in a different order every step, fragment the C heap: peak RSS grew
by ~15% on the default model.

A buffer returned here is overwritten by the next call with the same name: only a caller that is done
with it before any other dequantization (the frozen matmul's forward and backward) may use it. Not
thread-safe; one training process uses one thread for this.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

_BUFFERS: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of `numel` elements from the buffer `name`, grown (never shrunk) as needed."""
    key = (name, torch.device(device), dtype)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        _BUFFERS[key] = buffer
    return buffer[:numel]


def release() -> None:
    """Free every work buffer (e.g. after training)."""
    _BUFFERS.clear()


def word_table(byte_table: torch.Tensor) -> torch.Tensor:
    """(65536, 2k) from a (256, k) byte table: row w + 32768 holds the values of the two bytes whose
    little-endian int16 is w, so that one lookup decodes two bytes."""
    unsigned = (torch.arange(65536, device=byte_table.device) - 32768) & 0xFFFF
    return torch.cat([byte_table[unsigned & 255], byte_table[unsigned >> 8]], dim=1).contiguous()


def lookup(packed: torch.Tensor, byte_table: torch.Tensor, words: torch.Tensor, reuse_buffers: bool) -> torch.Tensor:
    """The fp32 values the packed bytes stand for, flat, in stream order.

    `byte_table` (256, k) and its `word_table` (65536, 2k): two bytes are read as one int16 and decoded at
    once when the byte count is even on a little-endian machine. With `reuse_buffers` the index and the
    result live in work buffers.
    """
    flat = packed.reshape(-1)
    if flat.numel() % 2 == 0 and sys.byteorder == "little":
        keys, table, shift = flat.view(torch.int16), words, 32768
    else:
        keys, table, shift = flat, byte_table, 0
    if not reuse_buffers:
        return F.embedding(keys.int().add_(shift), table).view(-1)
    index = scratch("dequantize.index", keys.numel(), torch.int32, packed.device).copy_(keys).add_(shift)
    values = scratch("dequantize.values", index.numel() * table.shape[1], torch.float32, packed.device)
    torch.index_select(table, 0, index, out=values.view(-1, table.shape[1]))
    return values


def cast(values: torch.Tensor, dtype: torch.dtype, reuse_buffers: bool) -> torch.Tensor:
    """`values.to(dtype)`, into a work buffer with `reuse_buffers`."""
    if values.dtype == dtype:
        return values
    if not reuse_buffers:
        return values.to(dtype)
    return scratch("dequantize.cast", values.numel(), dtype, values.device).view(values.shape).copy_(values)
