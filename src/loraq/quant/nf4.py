"""4-bit NF4 / FP4 block quantization with double-quantized constants (QLoRA), bit-exact with bitsandbytes.

Layout (bitsandbytes'): flatten the weight, cut it into blocks of `blocksize` contiguous values (the last
block may be short), scale each block by its absmax into [-1, 1], round to the nearest of 16 code values
(nearest = compare against the midpoints, a tie goes to the lower code), and pack two codes per byte with
the first element in the high nibble.

Double quantization stores the fp32 absmax values (one per block) as 8-bit codes instead: subtract their
mean, quantize blocks of 256 with the signed 8-bit dynamic code, keep one fp32 scale per 256 and the mean.
Cost per weight: 4 + 8/64 + 32/(64·256) = 4.127 bits with blocksize 64 (4.5 bits without).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from . import native
from .workspace import PIECE, Workspace, decoded, lookup, output, word_table

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bits) in bit-pattern order, normalised by its largest magnitude, 12.
FP4_VALUES = tuple(v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values of "nf4" or "fp4", indexed by the stored 4-bit code."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, dtype=torch.float32, device=device)


@cache
def dynamic_code_8bit() -> torch.Tensor:
    """The signed 8-bit dynamic-tree code (256 sorted values in [-1, 1]) used for the nested absmax.

    Seven decades 10^-6 .. 10^0, each split linearly into 2^i steps, both signs, plus 0 and 1. The smallest
    value is set to exactly -1 (bitsandbytes' quantizer does the same so that -1 is representable).
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (-6 + i) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    code = torch.tensor(sorted(values), dtype=torch.float32)
    code[0] = -1.0
    return code


@dataclass
class NF4State:
    """Everything needed to dequantize a 4-bit tensor besides its packed codes."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the original tensor (the default dequantize dtype)
    blocksize: int
    quant_type: str
    absmax: torch.Tensor  # fp32 (blocks,), or uint8 codes (blocks,) with double quantization
    offset: torch.Tensor | None = None  # fp32 scalar: mean of the absmax values (double quantization)
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(blocks/256),) (double quantization)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def block_absmax(self, workspace: Workspace | None = None) -> torch.Tensor:
        """The fp32 absmax per block, undoing the double quantization if there is one."""
        if not self.double_quant:
            return self.absmax
        assert self.nested_absmax is not None and self.offset is not None
        if workspace is None:
            return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, NESTED_BLOCKSIZE) + self.offset
        # The same float operations into work buffers: no small allocations interleaved with the big ones
        n, device = self.absmax.numel(), self.absmax.device
        padded = -(-n // NESTED_BLOCKSIZE) * NESTED_BLOCKSIZE
        index = workspace.get("absmax.index", padded, torch.int32, device)
        index[:n].copy_(self.absmax)
        index[n:].zero_()
        values = workspace.get("absmax.values", padded, torch.float32, device)
        torch.index_select(dynamic_code_8bit().to(device), 0, index, out=values)
        values.view(-1, NESTED_BLOCKSIZE).mul_(self.nested_absmax.unsqueeze(1))
        return values[:n].add_(self.offset)


def quantize_4bit(
    weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> tuple[torch.Tensor, NF4State]:
    """Quantize a float tensor to packed 4-bit codes.

    Args:
        weight: fp32, fp16 or bf16 tensor of any shape.
        blocksize: values per absmax block (32 ... 4096, a power of two).
        quant_type: "nf4" or "fp4".
        double_quant: quantize the absmax values too (4.127 instead of 4.5 bits per value at blocksize 64).

    Returns:
        (packed, state): packed is uint8 of shape (ceil(n/2), 1), two codes per byte, first in the high nibble.

    Raises:
        ValueError: an unsupported block size, quant type or dtype.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"can only quantize fp32, fp16 or bf16 tensors, got {weight.dtype}")
    code = code_4bit(quant_type, weight.device)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks multiply by the reciprocal, the short tail block divides: the same float operations as
    # bitsandbytes, so that values on a midpoint round the same way.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, midpoints)  # index into the sorted code; ties go to the lower value
    q = order[q].to(torch.uint8) if quant_type == "fp4" else q.to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    state = NF4State(tuple(weight.shape), weight.dtype, blocksize, quant_type, absmax)
    if double_quant:
        state.absmax, state.nested_absmax, state.offset = double_quantize(absmax)
    return packed, state


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The double quantization of every block's fp32 absmax of a weight: (uint8 codes, fp32 scale per 256 codes,
    the fp32 mean subtracted first)."""
    offset = absmax.mean()
    codes, nested = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return codes, nested, offset


def dequantize_4bit(
    packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None, workspace: Workspace | None = None
) -> torch.Tensor:
    """Unpack and rescale 4-bit codes to a tensor of `state.shape` (in `dtype`, default the original's).

    Computed in fp32 (code value times block absmax), then cast once. A fresh tensor each call, unless a
    `workspace` is given (frozen matmuls only): then a view of its output buffer.
    """
    n, dtype, device = state.numel, dtype or state.dtype, packed.device
    absmax = state.block_absmax(workspace).to(device)
    flat, blocksize = packed.reshape(-1), state.blocksize
    if blocksize % 2 == 0 and native.usable(dtype, packed):  # the same values, decoded in C
        out = output(workspace, n, dtype, device)
        native.nf4(flat, absmax, code_4bit(state.quant_type), blocksize, out)
        return out.view(state.shape)
    pairs, words = _byte_pairs(state.quant_type, device), _word_table(state.quant_type, device)

    def decode(start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        # start is a multiple of the block size (and so even): its code is a byte's high nibble
        values = lookup(flat[start // 2 : (stop + 1) // 2], pairs, words, workspace, buffer)[: stop - start]
        full = (stop - start) - (stop - start) % blocksize
        first = start // blocksize
        values[:full].view(-1, blocksize).mul_(absmax[first : first + full // blocksize].unsqueeze(1))
        if full < stop - start:
            values[full:].mul_(absmax[first + full // blocksize])
        return values

    if workspace is None:
        return decode(0, n).view(state.shape).to(dtype)
    step = max(1, PIECE // blocksize) * blocksize
    return decoded(workspace, n, dtype, device, step, decode).view(state.shape)


@cache
def _byte_pairs(quant_type: str, device: torch.device) -> torch.Tensor:
    code = code_4bit(quant_type, device)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2): byte -> (high, low)


@cache
def _word_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(65536, 4): the four values of each pair of bytes."""
    return word_table(_byte_pairs(quant_type, device))


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic code: (uint8 codes, fp32 absmax per block).

    Each value is divided by its block's absmax and mapped to the nearest code value; a tie keeps the lower.
    """
    code = dynamic_code_8bit().to(x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax.unsqueeze(1)).reshape(-1)[:n]
    idx = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 255)
    right = (idx + 1).clamp(max=255)
    closer_right = (normed - code[right]).abs() < (normed - code[idx]).abs()
    idx = torch.where(closer_right & (idx < 255), right, idx)
    return idx.to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`, in fp32."""
    code = dynamic_code_8bit().to(codes.device)
    flat = code[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (flat * scale).view(codes.shape)


def bits_per_value(state: NF4State) -> float:
    """Storage cost per quantized value: 4 bits of code plus the block constants."""
    n = state.numel
    constant_bits = state.absmax.numel() * state.absmax.element_size() * 8
    if state.double_quant:
        assert state.nested_absmax is not None
        constant_bits += state.nested_absmax.numel() * 32 + 32
    return 4 + constant_bits / n
