"""Group-wise asymmetric INT-k quantization (k = 2, 3, 4, 8): round-to-nearest, bit packing, dequantization.

Each output row is cut into groups of `group_size` consecutive input columns; a group stores a scale and an
offset (its minimum), both fp16, and k-bit codes q in [0, 2^k - 1] with w ≈ q·scale + offset. This is
GGUF Q4_1's layout at k=4, group 32 (d = scale, m = offset), and the round-to-nearest quantizer below is
llama.cpp's Q4_1 quantizer: min and max per group, scale = (max - min)/(2^k - 1), q = floor((w - min)/scale
+ 0.5) clamped, computed in fp32 from the unrounded min and scale, which are then stored as fp16.

Every tensor is made on the input's device, so quantizing runs where the weight is (CPU or CUDA). GPTQ, the
calibrated alternative to round-to-nearest, is in gptq.py.
"""

from __future__ import annotations

from functools import cache

import torch

from . import native
from .workspace import PIECE, Workspace, decoded, lookup, output, word_table

BITS = (2, 3, 4, 8)


def check_bits_and_group(bits: int, group_size: int, in_features: int, where: str = "") -> None:
    """Raise ValueError naming the problem unless `bits` and `group_size` fit a layer of `in_features`."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size < 2 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input size {in_features}{where}")


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest INT-k: (codes uint8 (out, in), scale fp16 (out, groups), offset fp16 (out, groups))."""
    out_features, in_features = weight.shape
    check_bits_and_group(bits, group_size, in_features)
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = (high - low) / (2**bits - 1)
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.floor((w - low.unsqueeze(2)) * inverse.unsqueeze(2) + 0.5).clamp_(0, 2**bits - 1)
    return codes.to(torch.uint8).reshape(out_features, in_features), scale.half(), low.half()


def dequantize_int(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """codes·scale + offset per group, computed in fp32 (as llama.cpp's dequantize_row_q4_1), then cast."""
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    w = codes.reshape(out_features, groups, in_features // groups).float()
    w = w * scale.float().unsqueeze(2) + offset.float().unsqueeze(2)
    return w.reshape(out_features, in_features).to(dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """k-bit codes (any shape, values < 2^k) as a little-endian bit stream in uint8 (8 codes per k bytes)."""
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    flat = torch.nn.functional.pad(flat, (0, pad)).view(-1, 8)
    word = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    for j in range(8):
        word |= flat[:, j] << (bits * j)
    shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    return ((word.unsqueeze(1) >> shifts) & 255).to(torch.uint8).reshape(-1)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_codes` of an (out, in) code matrix, as (out, in·bits/8) where a row fills whole 8-code chunks
    (in % 8 == 0, so each row is its own bytes of the same stream); else the flat stream."""
    packed = pack_codes(codes, bits)
    return packed.view(codes.shape[0], -1) if codes.shape[1] % 8 == 0 else packed


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes, uint8."""
    chunks = packed.reshape(-1, bits).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (chunks << shifts).sum(dim=1)  # disjoint bit ranges: the sum is the bitwise or
    parts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((word.unsqueeze(1) >> parts) & (2**bits - 1)).to(torch.uint8).reshape(-1)[:numel]


def dequantize_packed(
    packed: torch.Tensor,
    bits: int,
    scale: torch.Tensor,
    offset: torch.Tensor,
    dtype=torch.float32,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """`dequantize_int(unpack_codes(packed), scale, offset)` without materialising the codes: at 2, 4 and
    8 bits the packed bytes index a table of code values directly (two bytes at a time at 4 bits).
    With a `workspace` (frozen matmuls only) the result is a view of its output buffer."""
    out_features, groups = scale.shape
    group_size = packed.numel() * 8 // bits // (out_features * groups)
    in_features, device = groups * group_size, packed.device
    by_rows = packed.dim() == 2  # rows first (pack_rows): a row is whole bytes, so rows decode apart
    numel = out_features * in_features
    # INT4 of even rows in C (rows first and the flat stream are then the same bytes): the same values
    if bits == 4 and group_size % 2 == 0 and native.usable(dtype, packed, scale, offset):
        out = output(workspace, numel, dtype, device)
        native.int4(packed.reshape(-1), scale, offset, group_size, out)
        return out.view(out_features, in_features)

    def decode(start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        first, last = start // in_features, stop // in_features  # (whole rows: start and stop fall on rows)
        rows = packed[first:last] if by_rows else packed
        if bits in (2, 4):
            values = lookup(rows, _code_table(bits, 1, device), _code_table(bits, 2, device), workspace, buffer)
        elif buffer is not None:
            codes = rows.reshape(-1) if bits == 8 else unpack_codes(rows, bits, stop - start)
            values = buffer[: codes.numel()].copy_(codes)
        else:
            values = (rows.reshape(-1) if bits == 8 else unpack_codes(rows, bits, stop - start)).float()
        w = values[: stop - start].view(last - first, groups, group_size)
        # separate ops: as llama.cpp, no FMA
        w.mul_(scale[first:last].float().unsqueeze(2)).add_(offset[first:last].float().unsqueeze(2))
        return w.view(-1)

    if workspace is None:
        return decode(0, numel).view(out_features, in_features).to(dtype)
    step = max(1, PIECE // in_features) * in_features if by_rows else numel
    return decoded(workspace, numel, dtype, device, step, decode).view(out_features, in_features)


@cache
def _code_table(bits: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """(256^nbytes, 8·nbytes/bits) float table: the codes stored in each byte (pair), in stream order."""
    per_byte = 8 // bits
    byte = torch.arange(256, device=device)
    one = torch.stack([((byte >> (bits * j)) & (2**bits - 1)).float() for j in range(per_byte)], dim=1)
    return one if nbytes == 1 else word_table(one)


def packed_bytes(numel: int, bits: int) -> int:
    return -(-numel // 8) * bits


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - Ŵ||_F / ||W||_F."""
    return float((weight.float() - approx.float()).norm() / weight.float().norm().clamp(min=1e-30))
