"""The C dequantization (quant/native.c) against the PyTorch path it replaces on a CPU: bit for bit, for NF4/FP4
(with and without double quantization, odd sizes, every block size) and INT4 (rows first and the flat stream),
into fp32 and bf16, split over any number of threads; its portable build too; and the PyTorch path with one
line when there is no compiler. A training run computes the same losses either way."""

from __future__ import annotations

import json
import platform

import pytest
import torch

import loraq
from loraq.quant import intk, native, nf4
from loraq.quant.workspace import Workspace

pytestmark = pytest.mark.skipif(not native.enabled(), reason="no C compiler: the PyTorch path is the only one")


def pytorch_path(monkeypatch, fn):
    """fn() with the C path turned off (LORAQ_NATIVE=0)."""
    with monkeypatch.context() as m:
        m.setenv("LORAQ_NATIVE", "0")
        return fn()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("shape, blocksize, quant_type, double", [
    ((64, 256), 64, "nf4", True), ((7, 9), 64, "nf4", True), ((33, 65), 32, "fp4", False),
    ((300, 300), 4096, "nf4", True), ((3, 4097), 128, "nf4", False), ((512, 576), 64, "fp4", True),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_is_the_pytorch_path_bit_for_bit(monkeypatch, shape, blocksize, quant_type, double, dtype):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    packed, state = nf4.quantize_4bit(weight, blocksize, quant_type, double)
    for workspace in (None, Workspace()):
        ours = nf4.dequantize_4bit(packed, state, dtype, workspace).clone()
        theirs = pytorch_path(monkeypatch, lambda: nf4.dequantize_4bit(packed, state, dtype, Workspace()))
        assert same_bits(ours, theirs)


@pytest.mark.parametrize("shape, group", [((64, 256), 32), ((5, 96), 32), ((48, 512), 128), ((3, 12), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_is_the_pytorch_path_bit_for_bit(monkeypatch, shape, group, dtype):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 0.05
    codes, scale, offset = intk.quantize_rtn(weight, 4, group)
    for packed in (intk.pack_rows(codes, 4), intk.pack_codes(codes, 4)):  # rows first (or flat), and flat
        # trained constants reach the dequantization as fp32 (scale·(1 + gamma)): both kinds
        for s, m in ((scale, offset), (scale.float() * 1.01, offset.float() - 1e-4)):
            ours = intk.dequantize_packed(packed, 4, s, m, dtype, Workspace()).clone()
            theirs = pytorch_path(monkeypatch, lambda p=packed, s=s, m=m: intk.dequantize_packed(p, 4, s, m, dtype))
            assert same_bits(ours, theirs)


def nf4_and_int4(weight: torch.Tensor):
    """A function giving the weight's NF4 dequantized to bf16 and its INT4 g32 to fp32."""
    packed, state = nf4.quantize_4bit(weight)
    codes, scale, offset = intk.quantize_rtn(weight, 4, 32)
    int_packed = intk.pack_rows(codes, 4)
    return lambda: [nf4.dequantize_4bit(packed, state, torch.bfloat16),
                    intk.dequantize_packed(int_packed, 4, scale, offset)]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_any_split_over_threads_gives_the_same_bits(monkeypatch, threads):
    both = nf4_and_int4(torch.randn(259, 320, generator=torch.Generator().manual_seed(3)))  # 82,880 values: split
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = both()
    finally:
        torch.set_num_threads(before)
    assert all(same_bits(a, b) for a, b in zip(ours, pytorch_path(monkeypatch, both)))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 build without AVX-512")
def test_the_portable_build_is_bit_for_bit_too(monkeypatch, tmp_path):
    """Without AVX-512 (most laptops) the plain loops run: built here with -mno-avx512f, the same bits."""
    portable = native.load(native.build(("-mno-avx512f",), folder=tmp_path))
    both = nf4_and_int4(torch.randn(100, 640, generator=torch.Generator().manual_seed(4)))
    expected = pytorch_path(monkeypatch, both)
    monkeypatch.setattr(native, "library", lambda: portable)
    assert all(same_bits(a, b) for a, b in zip(both(), expected))
    from loraq.quant.schemes.intk import IntRTN

    layer = IntRTN(4, 32).quantize_layer("x", torch.randn(40, 640), None)  # and its few-rows loop
    x = torch.randn(3, 640)
    exact = x.double() @ layer.dequantize().double().T
    assert float((layer.few_rows(x, torch.float32).double() - exact).abs().max() / exact.abs().max()) <= 1e-6


def test_without_a_compiler_the_pytorch_path_runs_and_says_so_once(monkeypatch, tmp_path, capsys):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    packed, state = nf4.quantize_4bit(weight)
    expected = nf4.dequantize_4bit(packed, state, torch.bfloat16)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))  # (nothing built there yet)
    native.library.cache_clear()
    try:
        first = nf4.dequantize_4bit(packed, state, torch.bfloat16)
        again = nf4.dequantize_4bit(packed, state, torch.bfloat16)
        assert not native.enabled()
    finally:
        native.library.cache_clear()  # the next test builds (or finds) the real one again
    assert same_bits(first, expected) and same_bits(again, expected)
    said = [line for line in capsys.readouterr().err.splitlines() if "dequantization" in line]
    assert said == ["loraq: CPU dequantization in PyTorch (no C compiler found); set CC to a C compiler for the "
                    "faster one"]  # fmt: skip


@pytest.mark.parametrize("method, dora", [("qlora", False), ("qalora", False), ("qlora", True), ("qalora", True)])
def test_a_training_run_computes_the_same_losses_either_way(monkeypatch, tmp_path, tiny_model_dir, method, dora):
    """The dequantization in C is bit-identical. DoRA's C helpers sum in another order and form the magnitudes'
    gradient from fp32 products (PyTorch's: bf16 products); Adam's first steps move each magnitude by ~lr whatever
    its gradient's size, so that shows in the losses at 1e-4..1e-3 (the helpers themselves: the tests above)."""
    from conftest import E2E_TINY

    def run(folder: str) -> list[float]:
        config = loraq.TrainConfig(model=str(tiny_model_dir), data=str(E2E_TINY), out=str(tmp_path / folder),
                                   method=method, steps=3, batch_size=2, rank=4, warmup_steps=0, eval_every=3,
                                   device="cpu", compute_dtype="bf16", grad_checkpoint=True, dora=dora,
                                   lr=1e-2)  # fmt: skip
        loraq.train(config, progress=False)
        lines = (tmp_path / folder / "metrics.jsonl").read_text().splitlines()
        return [r[k] for r in map(json.loads, lines) for k in ("loss", "val_loss") if k in r]

    ours, theirs = run("native"), pytorch_path(monkeypatch, lambda: run("pytorch"))
    if dora:
        # before any update (validation, then the first step's loss) only the norm's summation order differs; under
        # bf16 autocast it can still flip the rounding of a row's k·scale (1.5e-5 of the first loss with transformers
        # 5.24), so 1e-4 there. (B = 0 until the first update, so these two only see k = m / norm; the helpers'
        # values themselves are checked exactly by the tests above, the later losses at 2e-3.)
        assert ours == pytest.approx(theirs, rel=2e-3) and ours[:2] == pytest.approx(theirs[:2], rel=1e-4)
    else:
        assert ours == theirs


def test_a_decode_counts_as_an_in_place_change_for_autograd():
    """The C code writes behind autograd's back: the output's version moves all the same, so a weight saved for
    backward and then overwritten raises (the guard of workspace.attached, tests/test_workspace.py)."""
    packed, state = nf4.quantize_4bit(torch.randn(8, 64))
    workspace = Workspace()
    out = nf4.dequantize_4bit(packed, state, torch.bfloat16, workspace)
    before = out._version
    nf4.dequantize_4bit(packed, state, torch.bfloat16, workspace)
    assert out._version > before


@pytest.mark.parametrize("kind", ["nf4-64", "fp4-128", "nf4-4096", "int4-32", "int4-128"])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_multiply_by_the_codes_as_dequantize_then_matmul_does(kind, rows, dtype):
    """Decoding (no gradient, a few rows): the layer multiplies in C without forming the weight; the weight's
    values are the dequantized ones exactly, only the order of the sums differs from a matmul."""
    from loraq.quant.frozen import NF4Linear
    from loraq.quant.schemes.intk import IntRTN

    name, size = kind.split("-")
    weight = torch.randn(96, 4096 if size == "4096" else 640, generator=torch.Generator().manual_seed(rows)) * 0.05
    if name == "int4":
        layer = IntRTN(4, int(size)).quantize_layer("x", weight, torch.randn(96))
    else:
        layer = NF4Linear(*nf4.quantize_4bit(weight, int(size), name), torch.randn(96))
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(7)).to(dtype)
    exact = torch.nn.functional.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    used = native.gemv_usable(x, dtype, layer.in_features, 32)
    assert used == (dtype == torch.float32 or rows <= 4)
    with torch.no_grad():
        fused = layer(x)
    with torch.enable_grad():  # the training path: dequantize, then multiply
        plain = layer(x).detach()
    assert fused.dtype == plain.dtype == dtype
    error = lambda y: float((y.double() - exact).abs().max() / exact.abs().max())  # noqa: E731
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3  # (bf16: the output's own rounding)
    assert error(fused) <= tolerance and error(plain) <= tolerance
    if used and dtype == torch.float32:
        assert not torch.equal(fused, plain) or rows == 1  # the C path did run: another order of the sums


def test_few_rows_are_not_taken_with_gradients_or_by_other_formats():
    from loraq.quant.schemes.intk import IntRTN

    layer = IntRTN(3, 32).quantize_layer("x", torch.randn(8, 64), None)  # INT3: no C loop
    assert layer.few_rows(torch.randn(1, 64), torch.float32) is None
    int4 = IntRTN(4, 32).quantize_layer("x", torch.randn(8, 64), None)
    assert int4.few_rows(torch.randn(17, 64), torch.float32) is None  # more rows than FEW_ROWS
    assert int4.few_rows(torch.randn(5, 64), torch.bfloat16) is None
    assert int4.few_rows(torch.randn(2, 64), torch.float32) is not None


@pytest.mark.parametrize("shape", [(1024, 576), (3, 40), (5000, 17), (2048, 2050)])
@pytest.mark.parametrize("threads", [1, 3])
def test_column_dots_are_the_float64_sums(monkeypatch, shape, threads):
    """DoRA's magnitude gradient Σ_t g·y in one C pass over bf16 tensors: the exact sums to fp32 rounding, the
    columns split over threads from 4M values (the last shape)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])).bfloat16()
    y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    got = native.column_dots(g, y)
    expected = (g.double() * y.double()).sum(dim=0)
    assert got.dtype == torch.float32 and got.shape == (shape[1],)
    assert float((got.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert native.column_dots(g.float(), y.float()) is None  # (fp32: the PyTorch path)


@pytest.mark.parametrize("group, bits", [(32, 4), (128, 4), (16, 2)])
def test_dora_group_norms_are_the_adapted_rows_norms(monkeypatch, group, bits):
    """The row norms of W0 + ΔW from the groups' code sums, in C and in PyTorch, against the formed weight."""
    from loraq.core.config import LoraConfig
    from loraq.core.lora import LoraLinear, _dora_norm_by_groups
    from loraq.quant.frozen import IntLinear

    torch.manual_seed(group)
    codes, scale, offset = intk.quantize_rtn(torch.randn(40, 4 * group), bits, group)
    layer = LoraLinear(IntLinear(codes, scale, offset, bits))
    adapter = layer.add_adapter(LoraConfig(r=4, alpha=8, method="qalora", group_size=group, use_dora=True))
    with torch.no_grad():
        adapter.B.normal_(0, 0.3)
    expected = adapter.adapted_norms(layer.base.dequantize(torch.float32).double()).double()
    in_c = _dora_norm_by_groups(adapter, layer.base)
    in_pytorch = pytorch_path(monkeypatch, lambda: _dora_norm_by_groups(adapter, layer.base))
    for got in (in_c, in_pytorch):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    assert native.dora_group_norms(adapter.B, adapter.A, 1.0, scale.float(), offset, adapter.base_code_sums, group,
                                   adapter.base_norm_sq) is None  # (fp32 constants: not the C path's)  # fmt: skip
