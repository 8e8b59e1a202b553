"""NF4/FP4 quantization against bitsandbytes 0.50.2 as the oracle, plus round-trip properties."""

import statistics

import bitsandbytes.functional as bnb
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from hypothesis import given, settings
from hypothesis import strategies as st

from loraq.quant.nf4 import (
    NF4_VALUES,
    bits_per_value,
    code_4bit,
    dequantize_4bit,
    dynamic_code_8bit,
    quantize_4bit,
)

SHAPES = [(64, 64), (128, 576), (7, 33), (3, 5), (1, 6), (576, 1536)]  # (1, 6): an odd byte count
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_absmax_and_dequantize_bit_exact(dtype, blocksize, quant_type):
    for shape in SHAPES:
        w = weight(shape, dtype)
        ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant=False)
        assert torch.equal(packed, ref_packed), shape
        assert torch.equal(state.absmax, ref_state.absmax), shape
        ours = dequantize_4bit(packed, state)
        # bitsandbytes' own reference dequantizer (the one its CPU kernel falls back to)
        ref = _dequantize_4bit_compute(
            ref_packed.reshape(-1), ref_state.absmax, code_4bit(quant_type), blocksize, shape, dtype
        )
        assert torch.equal(ours, ref), shape
        if blocksize in (32, 64):  # bitsandbytes' CPU C kernel agrees here (it is off for some 128..1024 shapes)
            assert torch.equal(ours, bnb.dequantize_4bit(ref_packed, ref_state)), shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quantization_matches_bitsandbytes(dtype):
    w = weight((576, 1536), dtype, seed=1)
    ref_packed, ref = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=True)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.offset, ref.offset)
    assert torch.equal(state.nested_absmax, ref.state2.absmax)
    # The nested 8-bit codes: ours is the nearest code value; bitsandbytes' C search puts a few near-ties
    # on the other neighbour (its threshold sits up to ~3% of a step off the midpoint). Never more than one step.
    same = state.absmax == ref.absmax
    assert same.float().mean() >= 0.99
    assert (state.absmax.int() - ref.absmax.int()).abs().max() <= 1
    deq, ref_deq = dequantize_4bit(packed, state).float(), bnb.dequantize_4bit(ref_packed, ref).float()
    rel = ((deq - ref_deq).abs().max() / ref_deq.abs().max()).item()
    assert rel < 1e-2  # one nested step moves a block absmax by at most ~2.5% of that block


def test_bits_per_value():
    w = weight((4096, 4096), torch.float32)
    assert bits_per_value(quantize_4bit(w, 64, "nf4", True)[1]) == pytest.approx(4.127, abs=1e-3)
    assert bits_per_value(quantize_4bit(w, 64, "nf4", False)[1]) == pytest.approx(4.5)


def test_nf4_table_is_the_normal_quantiles():
    """Recompute the NF4 code from N(0,1) quantiles with offset 0.9677083 (as the QLoRA paper)."""
    offset, n = 0.9677083, statistics.NormalDist()
    pos = [n.inv_cdf(offset - i * (offset - 0.5) / 8) for i in range(8)][::-1]
    neg = [-n.inv_cdf(offset - i * (offset - 0.5) / 7) for i in range(7)]
    values = sorted(neg + [0.0] + pos)
    top = max(abs(v) for v in values)
    assert [v / top for v in values] == pytest.approx(list(NF4_VALUES), abs=1e-6)


def test_dynamic_code_matches_bitsandbytes():
    ref = bnb.create_dynamic_map(signed=True)
    ours = dynamic_code_8bit()
    assert torch.equal(ours[1:], ref[1:]) and ours[0] == -1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(8, 8), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(8, 8), quant_type="int4")
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        quantize_4bit(torch.ones(8, 8, dtype=torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    scale=st.floats(1e-4, 1e3),
    blocksize=st.sampled_from([32, 64, 128]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_a_code_step(rows, cols, scale, blocksize, quant_type, double_quant, seed):
    w = torch.randn((rows, cols), generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    out = dequantize_4bit(packed, state)
    assert out.shape == w.shape and torch.isfinite(out).all()
    code = code_4bit(quant_type).sort().values
    half_step = ((code[1:] - code[:-1]).max() / 2).item()
    flat = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % blocksize)).view(-1, blocksize)
    bound = flat.abs().amax(1).repeat_interleave(blocksize)[: w.numel()]
    # double quantization perturbs each block's absmax by up to ~1% of the largest absmax
    slack = 0.02 * bound.max() if double_quant else 1e-6 * bound
    assert ((out - w).reshape(-1).abs() <= half_step * bound * (1 + 1e-5) + slack).all()
