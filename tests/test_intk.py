import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraq.quant.gptq import quantize_gptq
from loraq.quant.intk import (
    dequantize_int,
    pack_codes,
    quantize_rtn,
    relative_error,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (37, 13), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() // 8) * bits
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).view(37, 13), codes)


def test_four_bit_packing_is_low_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8), 4).tolist() == [
        0x21, 0x43, 0x65, 0x87,
    ]  # fmt: skip


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_error_is_within_half_a_step(bits, group_size):
    w = torch.randn(16, 256) * 0.05
    codes, scale, offset = quantize_rtn(w, bits, group_size)
    assert int(codes.max()) <= 2**bits - 1
    approx = dequantize_int(codes, scale, offset)
    step = scale.float().repeat_interleave(group_size, dim=1)
    # half a step, plus the fp16 rounding of scale and offset
    assert ((w - approx).abs() <= step / 2 + 2e-3 * w.abs().amax() + 1e-6).all()
    errors = [relative_error(w, dequantize_int(*quantize_rtn(w, b, group_size))) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_rtn_reproduces_weights_that_already_are_int4_values():
    """The default model's case: weights that are q·d + m with fp16 d, m come back with error 0."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (8, 64), generator=g).float()
    q[:, ::32] = 0  # llama.cpp's Q4_1 always uses codes 0 and 15 in every group
    q[:, 1::32] = 15
    d = (torch.rand(8, 2, generator=g) * 0.01 + 1e-3).half()
    m = (torch.randn(8, 2, generator=g) * 0.02).half()
    w = dequantize_int(q.to(torch.uint8), d, m)
    codes, scale, offset = quantize_rtn(w, 4, 32)
    assert torch.equal(codes, q.to(torch.uint8)) and torch.equal(scale, d) and torch.equal(offset, m)


def test_gptq_beats_rtn_on_the_calibration_outputs():
    torch.manual_seed(0)
    mix = torch.randn(128, 128) / 128**0.5
    x = torch.randn(2048, 128) @ mix + torch.randn(1, 128)  # correlated inputs, as real activations are
    w = torch.randn(64, 128) * 0.05
    h = x.T @ x
    for bits in (2, 3, 4):
        rtn = dequantize_int(*quantize_rtn(w, bits, 32))
        gptq = dequantize_int(*quantize_gptq(w, h, bits, 32))
        out_err = lambda approx: float(((x @ (w - approx).T) ** 2).mean())  # noqa: E731
        assert out_err(gptq) < 0.8 * out_err(rtn), bits


def test_bad_bits_and_groups_are_refused():
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        quantize_rtn(torch.randn(4, 64), 5, 32)
    with pytest.raises(ValueError, match="group size 48 does not divide the input size 64"):
        quantize_rtn(torch.randn(4, 64), 4, 48)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 8),
    groups=st.integers(1, 4),
    bits=st.sampled_from([2, 3, 4, 8]),
    scale=st.floats(1e-4, 1e3),
    seed=st.integers(0, 2**16),
)
def test_rtn_property_finite_and_bounded(rows, groups, bits, scale, seed):
    w = torch.randn(rows, 32 * groups, generator=torch.Generator().manual_seed(seed)) * scale
    codes, s, o = quantize_rtn(w, bits, 32)
    approx = dequantize_int(codes, s, o)
    assert torch.isfinite(approx).all()
    # half a step, plus the fp16 rounding of scale (relative, or half the 2^-24 subnormal spacing for tiny
    # weights, times a code of up to 2^k - 1) and of the offset
    fp16_scale = (2**bits) * 2**-25
    assert (
        float((w - approx).abs().max()) <= float(s.float().max()) / 2 + 2e-3 * float(w.abs().max()) + fp16_scale + 1e-6
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_dequantize_equals_the_plain_formula(bits):
    from loraq.quant.intk import dequantize_packed

    w = torch.randn(24, 96)
    codes, scale, offset = quantize_rtn(w, bits, 32)
    expected = dequantize_int(codes, scale, offset)
    assert torch.equal(dequantize_packed(pack_codes(codes, bits), bits, scale, offset), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_scaled_weight_is_the_weight_times_each_row_s_factor(bits, dtype):
    """DoRA's k folded into the group constants (IntLinear.scaled_weight) gives k·W, rounded once in `dtype`;
    an NF4 layer scales its dequantized weight instead."""
    from loraq.quant.frozen import IntLinear, NF4Linear
    from loraq.quant.nf4 import quantize_4bit

    torch.manual_seed(bits)
    codes, scale, offset = quantize_rtn(torch.randn(24, 96), bits, 32)
    k = torch.rand(24) + 0.5
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    for layer in (IntLinear(codes, scale, offset, bits), NF4Linear(*quantize_4bit(torch.randn(24, 96), blocksize=32))):
        expected = layer.dequantize(torch.float32) * k[:, None]
        scaled = layer.scaled_weight(k, dtype)
        assert scaled.dtype == dtype
        torch.testing.assert_close(scaled.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
