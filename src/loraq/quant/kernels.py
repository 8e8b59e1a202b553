"""Triton kernels for the frozen 4-bit layers on CUDA: dequantize NF4 / FP4 (double-quantized block constants
or plain fp32 ones) and INT-k (k = 2, 3, 4, 8; fp16 scale and offset per group) straight to the compute dtype
in one pass, and a fused dequantize-and-multiply for few rows (decoding) that never writes the weight.

They read the very layouts the PyTorch path (nf4.py, intk.py) reads — no repacking — and compute each value
as it does, in fp32 with the same operations in the same order and no fused multiply-add (the launches pass
`enable_fp_fusion=False`), so the fp32 result equals the CPU's bit for bit and a 16-bit one is a cast of it.
On a CPU they run under Triton's interpreter (`TRITON_INTERPRET=1`, set before this module is imported),
which is how the tests check them; nothing else uses them there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import NESTED_BLOCKSIZE, NF4State, code_4bit, dynamic_code_8bit

DEQUANT_BLOCK = 1024
GEMV_MAX_ROWS = 16  # rows (tokens) up to which the fused kernel replaces dequantize + matmul
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _nf4_values(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, e, mask,
                BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):  # fmt: skip
    """fp32 values of flat elements `e` of an NF4/FP4 tensor: code value times the block's absmax."""
    byte = tl.load(packed_ptr + e // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where(e % 2 == 0, byte >> 4, byte & 15)  # the first element is in the high nibble
    block = e // BLOCKSIZE
    if DOUBLE_QUANT:
        a = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(dyn_ptr + a, mask=mask, other=0.0) * tl.load(
            nested_ptr + block // NESTED, mask=mask, other=0.0
        )
        absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.load(code_ptr + q, mask=mask, other=0.0) * absmax


NESTED = tl.constexpr(NESTED_BLOCKSIZE)


@triton.jit
def _store(out_ptr, e, v, mask, BF16: tl.constexpr):
    """Store fp32 values in the output's dtype. bf16 is rounded to nearest-even by hand into int16 bits (what
    the GPU's own conversion does for finite values, and what Triton's interpreter does not: it truncates)."""
    if BF16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + e, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + e, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int_values(packed_ptr, scale_ptr, offset_ptr, e, mask, n_bytes, in_features,
                BITS: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    """fp32 values of flat elements `e` of an INT-k tensor: code·scale + offset of the element's group."""
    bit = e * BITS  # the codes are one little-endian bit stream
    byte = bit >> 3
    low = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
    high = tl.load(packed_ptr + byte + 1, mask=mask & (byte + 1 < n_bytes), other=0).to(tl.int32)
    q = ((low | (high << 8)) >> (bit & 7)) & ((1 << BITS) - 1)
    group = (e // in_features) * (in_features // GROUP) + (e % in_features) // GROUP
    scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
    offset = tl.load(offset_ptr + group, mask=mask, other=0.0).to(tl.float32)
    return q.to(tl.float32) * scale + offset


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, out_ptr, n,
                           BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BF16: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    v = _nf4_values(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, e, mask, BLOCKSIZE,
                    DOUBLE_QUANT)  # fmt: skip
    _store(out_ptr, e, v, mask, BF16)


@triton.jit
def _int_dequantize_kernel(packed_ptr, scale_ptr, offset_ptr, out_ptr, n, n_bytes, in_features, BITS: tl.constexpr,
                           GROUP: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    v = _int_values(packed_ptr, scale_ptr, offset_ptr, e, mask, n_bytes, in_features, BITS, GROUP)
    _store(out_ptr, e, v, mask, BF16)


@triton.jit
def _gemv_kernel(x_ptr, y_ptr, rows, out_features,
                 packed_ptr, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, n_bytes,
                 NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 BITS: tl.constexpr, GROUP: tl.constexpr, in_features: tl.constexpr, BF16: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """y (rows, out) = x (rows, in) @ W.T for rows <= BLOCK_M, W dequantized tile by tile in registers.
    (in_features is a compile-time constant: one compilation per layer width.)"""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros, a @jit helper: see tests/test_kernels.py
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        tile_mask = (n[:, None] < out_features) & (k[None, :] < in_features)
        e = n[:, None].to(tl.int64) * in_features + k[None, :]
        if NF4:
            w = _nf4_values(packed_ptr, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, e, tile_mask, BLOCKSIZE, DOUBLE_QUANT)
        else:
            w = _int_values(packed_ptr, a_ptr, b_ptr, e, tile_mask, n_bytes, in_features, BITS, GROUP)
        x = tl.load(x_ptr + m[:, None] * in_features + k[None, :],
                    mask=(m[:, None] < rows) & (k[None, :] < in_features), other=0.0)  # fmt: skip
        # fp32 operands: decoding is bound by reading W, and fp32 keeps the result that of the fp32 weight
        acc += tl.dot(x.to(tl.float32), tl.trans(w), out_dtype=tl.float32, input_precision="ieee")
    _store(y_ptr, m[:, None] * out_features + n[None, :], acc, (m[:, None] < rows) & (n[None, :] < out_features),
           BF16)  # fmt: skip


def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return code_4bit(quant_type, device), dynamic_code_8bit().to(device)


def _nf4_args(packed: torch.Tensor, state: NF4State) -> tuple:
    code, dyn = _tables(state.quant_type, packed.device)
    dq = state.double_quant
    nested = state.nested_absmax if dq else state.absmax  # unused without double quantization
    offset = state.offset.reshape(1) if dq else state.absmax
    return packed.reshape(-1), state.absmax.reshape(-1), nested, offset, code, dyn


def _written(out: torch.Tensor) -> torch.Tensor:
    """`out`, counted as changed in place: a kernel writes it behind autograd's back, and a weight saved for
    backward then overwritten must still raise autograd's version error (workspace.attached relies on it)."""
    torch.autograd.graph.increment_version(out)
    return out


def nf4_dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype, out: torch.Tensor | None = None):
    """The weight of shape `state.shape` in `dtype`, written into `out` (a flat buffer) when given."""
    n = state.numel
    out = torch.empty(n, dtype=dtype, device=packed.device) if out is None else _written(out[:n])
    grid = (triton.cdiv(n, DEQUANT_BLOCK),)
    _nf4_dequantize_kernel[grid](*_nf4_args(packed, state), _bits_of(out), n, BLOCKSIZE=state.blocksize,
                                 DOUBLE_QUANT=state.double_quant, BF16=dtype == torch.bfloat16,
                                 BLOCK=DEQUANT_BLOCK, **_exact())  # fmt: skip
    return out.view(state.shape)


def int_dequantize(packed: torch.Tensor, bits: int, scale: torch.Tensor, offset: torch.Tensor,
                   dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """codes·scale + offset, (out, in) in `dtype`, written into `out` (a flat buffer) when given."""
    out_features, groups = scale.shape
    n = packed.numel() * 8 // bits
    in_features = n // out_features
    out = torch.empty(n, dtype=dtype, device=packed.device) if out is None else _written(out[:n])
    grid = (triton.cdiv(n, DEQUANT_BLOCK),)
    _int_dequantize_kernel[grid](packed.reshape(-1), scale.contiguous(), offset.contiguous(), _bits_of(out), n,
                                 packed.numel(), in_features, BITS=bits, GROUP=in_features // groups,
                                 BF16=dtype == torch.bfloat16, BLOCK=DEQUANT_BLOCK, **_exact())  # fmt: skip
    return out.view(out_features, in_features)


def gemv(x: torch.Tensor, layer) -> torch.Tensor:
    """x (..., in) @ W.T for a frozen NF4Linear / IntLinear and at most GEMV_MAX_ROWS rows, in x's dtype."""
    in_features, out_features = layer.in_features, layer.out_features
    x2 = x.reshape(-1, in_features).contiguous()
    rows = x2.shape[0]
    assert rows <= GEMV_MAX_ROWS, rows
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if hasattr(layer, "bits"):
        args = (layer.packed.reshape(-1), layer.scale, layer.offset, layer.scale, layer.scale, layer.scale)
        flags = dict(NF4=False, BLOCKSIZE=64, DOUBLE_QUANT=False, BITS=layer.bits, GROUP=layer.group_size)
    else:
        args = _nf4_args(layer.packed, layer.state())
        flags = dict(NF4=True, BLOCKSIZE=layer.blocksize, DOUBLE_QUANT=layer.offset is not None, BITS=4, GROUP=32)
    block_n = 64
    grid = (triton.cdiv(out_features, block_n),)
    _gemv_kernel[grid](x2, _bits_of(y), rows, out_features, *args, layer.packed.numel(), **flags,
                       in_features=in_features, BF16=x.dtype == torch.bfloat16, BLOCK_M=16, BLOCK_N=block_n,
                       BLOCK_K=64, **_exact())  # fmt: skip
    return y.view(*x.shape[:-1], out_features)


def _bits_of(out: torch.Tensor) -> torch.Tensor:
    """bf16 buffers are written as their int16 bits (see _store)."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def _exact() -> dict:
    """Launch options: no fused multiply-add, so values round as the PyTorch path's (the interpreter, which
    computes in NumPy, takes no options)."""
    from triton.runtime.interpreter import InterpretedFunction

    return {} if isinstance(_int_dequantize_kernel, InterpretedFunction) else {"enable_fp_fusion": False}
