"""GGUF block types as codes and constants: every common linear-weight type decodes to

    w = a[g] · q + b[g]        q: integer codes (int16), a, b: fp32 per sub-block g of `sub` weights

computed in fp32 with exactly the operations of the `gguf` package's dequantizers (so the result equals them,
and llama.cpp's, bit for bit): symmetric types have b = None and w = a·q with q centred (Q4_0's q − 8).

| type | block | sub | w | constants |
|---|---|---|---|---|
| Q4_0, Q5_0, Q8_0 | 32 | 32 | d·(q − 8 / 16 / 0) | fp16 d |
| Q4_1, Q5_1 | 32 | 32 | d·q + m | fp16 d, fp16 m |
| Q2_K | 256 | 16 | d·sc·q − dmin·mn | fp16 d, dmin; 4-bit sc, mn per 16 |
| Q3_K | 256 | 16 | d·(sc − 32)·q, q in −4..3 | fp16 d; 6-bit sc per 16 |
| Q4_K, Q5_K | 256 | 32 | d·sc·q − dmin·mn | fp16 d, dmin; 6-bit sc, mn per 32 |
| Q6_K | 256 | 16 | d·sc·(q − 32) | fp16 d; int8 sc per 16 |

`decode` gives (q, a, b); `encode_codes` writes new codes back into the blocks (the constants untouched), and
`set_offsets` writes new offsets where the type stores them, so that a merge changes what the format lets it
change and nothing else. Layouts: ggml-common.h, checked against gguf.quants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int  # weights per block
    nbytes: int  # bytes per block
    sub: int  # weights sharing one (a, b)
    bits: int  # code width
    center: int  # subtracted from the stored code (symmetric types)
    offsets: str  # "free" (fp16 per sub-block), "quantized" (K-quant mins), "none"


TYPES = {
    t.name: t
    for t in (
        BlockType("Q4_0", 32, 18, 32, 4, 8, "none"),
        BlockType("Q4_1", 32, 20, 32, 4, 0, "free"),
        BlockType("Q5_0", 32, 22, 32, 5, 16, "none"),
        BlockType("Q5_1", 32, 24, 32, 5, 0, "free"),
        BlockType("Q8_0", 32, 34, 32, 8, 0, "none"),
        BlockType("Q2_K", QK_K, 84, 16, 2, 0, "quantized"),
        BlockType("Q3_K", QK_K, 110, 16, 3, 4, "none"),
        BlockType("Q4_K", QK_K, 144, 32, 4, 0, "quantized"),
        BlockType("Q5_K", QK_K, 176, 32, 5, 0, "quantized"),
        BlockType("Q6_K", QK_K, 210, 16, 6, 32, "none"),
    )
}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (...) fp32 of the little-endian fp16 they hold."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Bytes (n, c·chunk) -> codes (n, c, 2, chunk): within each chunk the low nibbles, then the high ones."""
    q = qs.reshape(qs.shape[0], -1, 1, chunk).to(torch.int16)
    return (q >> torch.tensor([0, 4], dtype=torch.int16, device=qs.device).view(1, 1, 2, 1)) & 15


def _crumbs(qs: torch.Tensor, chunk: int, width: int) -> torch.Tensor:
    """Bytes (n, c·chunk) -> (n, c, 8/width, chunk): bit fields of `width` bits, lowest first."""
    q = qs.reshape(qs.shape[0], -1, 1, chunk).to(torch.int16)
    shifts = torch.arange(0, 8, width, dtype=torch.int16, device=qs.device).view(1, 1, -1, 1)
    return (q >> shifts) & ((1 << width) - 1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (n, 8) each."""
    s = scales.reshape(-1, 3, 4).to(torch.int16)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales_pack(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of `_k_scales`: (n, 8) six-bit scales and mins -> (n, 12) bytes."""
    sc, mn = sc.to(torch.int16), mn.to(torch.int16)
    d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] & 0x30) << 2)
    m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] & 0x30) << 2)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([d, m, md], dim=-1).to(torch.uint8)


def decode(blocks: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Blocks (rows, row_bytes) uint8 -> codes q (rows, cols) int16, a (rows, cols/sub) fp32, b or None."""
    t = TYPES[type_name]
    rows = blocks.shape[0]
    x = blocks.reshape(-1, t.nbytes)
    n = x.shape[0]
    if t.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        pos = 4 if t.name.endswith("_1") else 2
        qs = x[:, pos + (4 if t.bits == 5 else 0) :]
        q = _nibbles(qs, 16).reshape(n, 32)
        if t.bits == 5:
            qh = x[:, pos : pos + 4].contiguous().view(torch.int32).to(torch.int64)
            high = (qh >> torch.arange(32, device=x.device)) & 1
            q = q | (high.to(torch.int16) << 4)
        a = _f16(x[:, 0:2]).unsqueeze(1)
        b = _f16(x[:, 2:4]).unsqueeze(1) if t.name.endswith("_1") else None
        q = q - t.center
    elif t.name == "Q8_0":
        q = x[:, 2:].contiguous().view(torch.int8).to(torch.int16)
        a, b = _f16(x[:, 0:2]).unsqueeze(1), None
    elif t.name == "Q2_K":
        scales, qs, d, dmin = x[:, :16].to(torch.int16), x[:, 16:80], _f16(x[:, 80:82]), _f16(x[:, 82:84])
        a = d.unsqueeze(1) * (scales & 0xF).float()
        b = -(dmin.unsqueeze(1) * (scales >> 4).float())
        q = _crumbs(qs, 32, 2).reshape(n, QK_K)
    elif t.name == "Q3_K":
        hmask, qs, scales, d = x[:, :32], x[:, 32:96], x[:, 96:108].to(torch.int16), _f16(x[:, 108:110])
        low = (scales[:, :8].unsqueeze(1) >> torch.tensor([0, 4], device=x.device).view(1, 2, 1)).reshape(n, 16)
        high = (scales[:, 8:].unsqueeze(1) >> torch.tensor([0, 2, 4, 6], device=x.device).view(1, 4, 1)).reshape(n, 16)
        sc = ((low & 0x0F) | ((high & 0x03) << 4)) - 32
        a, b = d.unsqueeze(1) * sc.float(), None
        ql = _crumbs(qs, 32, 2).reshape(n, QK_K)
        qh = _crumbs(hmask, 32, 1).reshape(n, QK_K)
        q = ql - ((qh ^ 1) << 2)
    elif t.name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(x[:, 0:2]), _f16(x[:, 2:4])
        sc, mn = _k_scales(x[:, 4:16])
        a = d.unsqueeze(1) * sc.float()
        b = -(dmin.unsqueeze(1) * mn.float())
        if t.name == "Q4_K":
            q = _nibbles(x[:, 16:], 32).reshape(n, QK_K)
        else:
            q = _nibbles(x[:, 48:], 32).reshape(n, QK_K) | (_crumbs(x[:, 16:48], 32, 1).reshape(n, QK_K) << 4)
    elif t.name == "Q6_K":
        ql, qh, scales, d = x[:, :128], x[:, 128:192], x[:, 192:208], _f16(x[:, 208:210])
        a, b = d.unsqueeze(1) * scales.contiguous().view(torch.int8).float(), None
        low = _nibbles(ql, 64).reshape(n, QK_K)
        high = _crumbs(qh, 32, 2).reshape(n, QK_K)
        q = (low | (high << 4)) - 32
    else:  # pragma: no cover - TYPES and this function list the same types
        raise KeyError(type_name)
    cols = n * t.block // rows
    a = a.reshape(rows, cols // t.sub)
    b = None if b is None else b.reshape(rows, cols // t.sub)
    return q.reshape(rows, cols), a, b


def dequantize(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """fp32 weights (rows, cols): a·q (+ b) per sub-block, as the gguf package computes them."""
    q, a, b = decode(blocks, type_name)
    sub = TYPES[type_name].sub
    w = a.repeat_interleave(sub, dim=1) * q.float()
    return w if b is None else w + b.repeat_interleave(sub, dim=1)


def _pack_nibbles(q: torch.Tensor, chunk: int) -> torch.Tensor:
    """Inverse of `_nibbles`: codes (n, c·2·chunk) in element order -> bytes (n, c·chunk)."""
    q = q.reshape(q.shape[0], -1, 2, chunk).to(torch.int16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1).to(torch.uint8)


def _pack_crumbs(q: torch.Tensor, chunk: int, width: int) -> torch.Tensor:
    """Inverse of `_crumbs`: fields (n, c·(8/width)·chunk) in element order -> bytes (n, c·chunk)."""
    per = 8 // width
    q = q.reshape(q.shape[0], -1, per, chunk).to(torch.int16)
    shifts = torch.arange(0, 8, width, dtype=torch.int16, device=q.device).view(1, 1, -1, 1)
    return (q << shifts).sum(dim=2).reshape(q.shape[0], -1).to(torch.uint8)


def code_range(type_name: str) -> tuple[int, int]:
    """The smallest and largest code `decode` can return for this type."""
    t = TYPES[type_name]
    low = -t.center if t.name != "Q8_0" else -128
    return low, low + (1 << t.bits) - 1


def encode_codes(blocks: torch.Tensor, type_name: str, q: torch.Tensor) -> torch.Tensor:
    """New blocks holding codes `q` (as `decode` returns them, within `code_range`) and the old constants.
    For the types without offsets (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K), where a merge moves codes."""
    t = TYPES[type_name]
    rows = blocks.shape[0]
    x = blocks.reshape(-1, t.nbytes).clone()
    n = x.shape[0]
    q = q.reshape(n, t.block).to(torch.int16)
    if t.name in ("Q4_0", "Q5_0"):
        stored = q + t.center
        pos = 2 + (4 if t.bits == 5 else 0)
        x[:, pos:] = _pack_nibbles(stored & 15, 16)
        if t.bits == 5:
            high = ((stored >> 4) & 1).to(torch.int64) << torch.arange(32, device=x.device)
            x[:, 2:6] = high.sum(dim=1).to(torch.int32).view(torch.uint8).reshape(n, 4)
    elif t.name == "Q8_0":
        x[:, 2:] = q.to(torch.int8).view(torch.uint8)
    elif t.name == "Q3_K":
        high = (q >= 0).to(torch.int16)
        x[:, 32:96] = _pack_crumbs(q + 4 * (1 - high), 32, 2)
        x[:, :32] = _pack_crumbs(high, 32, 1)
    elif t.name == "Q6_K":
        stored = q + 32
        x[:, :128] = _pack_nibbles(stored & 15, 64)
        x[:, 128:192] = _pack_crumbs(stored >> 4, 32, 2)
    else:
        raise ValueError(f"{type_name} keeps its codes on merge; its offsets move instead")
    return x.reshape(rows, -1)


def set_offsets(blocks: torch.Tensor, type_name: str, b: torch.Tensor) -> torch.Tensor:
    """New blocks whose per-sub-block offsets are as close to `b` (rows, cols/sub) as the type can hold:
    Q4_1 / Q5_1 store them as fp16; Q2_K, Q4_K and Q5_K as unsigned integer mins (4 / 6 / 6 bits) times one
    fp16 dmin per super-block, which is fitted again to the new offsets."""
    t = TYPES[type_name]
    rows = blocks.shape[0]
    x = blocks.reshape(-1, t.nbytes).clone()
    n = x.shape[0]
    b = b.reshape(n, -1).float()
    if t.offsets == "free":
        x[:, 2:4] = b.half().view(torch.uint8).reshape(n, 2)
    elif t.offsets == "quantized":
        top = 15 if t.name == "Q2_K" else 63
        need = -b  # w = a·q − dmin·mn: mn·dmin must be −b
        fitted = torch.where(need.amax(dim=1) > 0, need.amax(dim=1), need.amin(dim=1)) / top
        where = slice(82, 84) if t.name == "Q2_K" else slice(2, 4)
        current = _f16(x[:, where])
        # per super-block, the dmin (kept or fitted again) whose grid of mins is nearest to the new offsets
        best_mn, best_dmin, best_err = None, None, None
        for dmin in (current.half(), fitted.half()):
            safe = torch.where(dmin == 0, torch.ones_like(dmin), dmin).float().unsqueeze(1)
            mn = torch.where(dmin.unsqueeze(1) == 0, 0.0, torch.round(need / safe)).clamp(0, top)
            err = (mn * dmin.float().unsqueeze(1) - need).abs().amax(dim=1)
            if best_err is None:
                best_mn, best_dmin, best_err = mn, dmin, err
            else:
                better = err < best_err
                best_mn = torch.where(better.unsqueeze(1), mn, best_mn)
                best_dmin, best_err = torch.where(better, dmin, best_dmin), torch.minimum(err, best_err)
        mn = best_mn.to(torch.int16)
        x[:, where] = best_dmin.contiguous().view(torch.uint8).reshape(n, 2)
        if t.name == "Q2_K":
            x[:, :16] = ((x[:, :16].to(torch.int16) & 0x0F) | (mn << 4)).to(torch.uint8)
        else:
            sc, _ = _k_scales(x[:, 4:16])
            x[:, 4:16] = _k_scales_pack(sc, mn)
    else:
        raise ValueError(f"{type_name} stores no offsets")
    return x.reshape(rows, -1)


# Where each type keeps the fp16 factors every weight of its block is a multiple of: d, and the K-quants' dmin
# (a weight is d·(code·scale) + (m or -dmin·min)), as byte offsets in the block.
BLOCK_FACTORS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}  # fmt: skip


def scale_rows(blocks: torch.Tensor, type_name: str, k: torch.Tensor) -> torch.Tensor:
    """New blocks (rows, row_bytes) whose every weight of row o is k[o] times the old one: each block's fp16
    d (and m or dmin) multiplied by k[o] (computed in fp32, stored fp16), codes and sub-block scales untouched.
    Exact up to the fp16 rounding of the products: how DoRA's row factor alone folds into any type."""
    t = TYPES[type_name]
    x = blocks.reshape(blocks.shape[0], -1, t.nbytes).clone()
    factor = k.float().to(x.device).view(-1, 1)
    for at in BLOCK_FACTORS[type_name]:
        value = x[:, :, at : at + 2].contiguous().view(torch.float16).squeeze(-1).float()
        x[:, :, at : at + 2] = (value * factor).half().unsqueeze(-1).view(torch.uint8)
    return x.reshape(blocks.shape)
