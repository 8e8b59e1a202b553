"""The Triton kernels of the frozen 4-bit layers, checked against the PyTorch path on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, small shapes); the same checks on CUDA run where a GPU is."""

import os

import pytest
import torch

# Before the kernels are defined; only they read it. (Triton itself may already be imported by then, through
# torch or accelerate, with its @jit standard-library helpers such as tl.zeros compiled, not interpreted: the
# kernels use builtins only.)
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
kernels = pytest.importorskip("loraq.quant.kernels")

from loraq.quant.frozen import IntLinear, NF4Linear  # noqa: E402
from loraq.quant.intk import quantize_rtn  # noqa: E402
from loraq.quant.nf4 import quantize_4bit  # noqa: E402

# Interpreted (the default here) the kernels run on CPU tensors; compiled (TRITON_INTERPRET=0 on a GPU
# machine, as bench/gpu.sh runs them) on CUDA tensors.
DEVICES = ["cpu"] if os.environ["TRITON_INTERPRET"] == "1" else ["cuda"] if torch.cuda.is_available() else []
if not DEVICES:
    pytest.skip("compiled Triton kernels need CUDA", allow_module_level=True)


def nf4_layer(shape, quant_type="nf4", double_quant=True, device="cpu", seed=0):
    torch.manual_seed(seed)
    packed, state = quantize_4bit(torch.randn(shape) * 0.05, 64, quant_type, double_quant)
    return NF4Linear(packed, state).to(device)


def int_layer(shape, bits, group_size=32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return IntLinear(*quantize_rtn(torch.randn(shape) * 0.05, bits, group_size), bits).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(32, 64), (48, 96), (7, 160)])  # the last: a short final NF4 block
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_nf4_dequantize_equals_the_pytorch_path_bit_for_bit(device, shape, quant_type, double_quant):
    layer = nf4_layer(shape, quant_type, double_quant, device)
    expected = layer.dequantize(torch.float32)  # the PyTorch path
    got = kernels.nf4_dequantize(layer.packed, layer.state(), torch.float32)
    assert torch.equal(got, expected)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(kernels.nf4_dequantize(layer.packed, layer.state(), dtype), expected.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int_dequantize_equals_the_pytorch_path_bit_for_bit(device, bits, group_size):
    layer = int_layer((40, 128), bits, group_size, device)
    expected = layer.dequantize(torch.float32)
    got = kernels.int_dequantize(layer.packed, bits, layer.scale, layer.offset, torch.float32)
    assert torch.equal(got, expected)
    assert torch.equal(
        kernels.int_dequantize(layer.packed, bits, layer.scale, layer.offset, torch.bfloat16), expected.bfloat16()
    )


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_writes_into_a_given_buffer(device):
    layer = int_layer((16, 64), 4, device=device)
    buffer = torch.full((16 * 64 + 10,), 7.0, device=device)
    version = buffer._version
    got = kernels.int_dequantize(layer.packed, 4, layer.scale, layer.offset, torch.float32, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, layer.dequantize())
    assert torch.equal(buffer[-10:], torch.full((10,), 7.0, device=device))
    assert buffer._version > version  # written in place, as autograd counts it (workspace.attached's guard)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", ["nf4", "int4", "int3", "int2"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_fused_gemv_equals_dequantize_then_matmul(device, make, rows):
    bits = 4 if make == "nf4" else int(make[3])
    layer = nf4_layer((96, 128), device=device) if make == "nf4" else int_layer((96, 128), bits, device=device)
    x = torch.randn(rows, 128, device=device)
    expected = x @ layer.dequantize(torch.float32).T
    got = kernels.gemv(x, layer)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    x3 = x.reshape(1, rows, 128)
    torch.testing.assert_close(kernels.gemv(x3, layer), expected.reshape(1, rows, 96), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gemv_in_bf16_rounds_like_the_gpu(device):
    layer = int_layer((64, 128), 4, device=device)
    x = torch.randn(3, 128, device=device).bfloat16()
    expected = (x.float() @ layer.dequantize(torch.bfloat16).float().T).bfloat16()
    torch.testing.assert_close(kernels.gemv(x, layer), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(DEVICES != ["cuda"], reason="the layers choose the kernels for CUDA tensors only")
@pytest.mark.parametrize("make", ["nf4", "int4", "int3"])
@pytest.mark.parametrize("rows", [1, 64])  # the fused kernel, then dequantize + matmul
def test_layers_on_cuda_compute_what_the_cpu_does(make, rows):
    from loraq.quant.workspace import attached

    cpu = nf4_layer((96, 128)) if make == "nf4" else int_layer((96, 128), int(make[3]))
    gpu = cpu.to("cuda")
    torch.manual_seed(0)
    x = torch.randn(rows, 128, requires_grad=True)
    xg = x.detach().cuda().requires_grad_(True)
    y = cpu(x)
    with attached(torch.nn.Sequential(gpu)):
        yg = gpu(xg)
        yg.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(yg.cpu(), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(gpu.dequantize(torch.float32).cpu(), cpu.dequantize(torch.float32))
