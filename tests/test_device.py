"""Where a run computes: CUDA device numbers, GPUs without bf16, the frozen base in 16 bits on a GPU, and the
fallback when Triton is missing. (CUDA itself is stood in for by monkeypatching here; tests that need a GPU
are in test_kernels.py and test_schemes.py and skip without one.)"""

import sys

import pytest
import torch

import loraq
from loraq import LoraConfig, LoraqError, TrainConfig
from loraq.product.device import resolve_device
from loraq.product.train import frozen_to
from loraq.quant.frozen import quantized_tensor_ids


@pytest.fixture
def two_gpus_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)


def test_an_absent_cuda_device_names_those_present(two_gpus_without_bf16):
    with pytest.raises(LoraqError, match=r"--device cuda:2: no such CUDA device; .* cuda:0 \(Tesla T4\), cuda:1"):
        resolve_device(TrainConfig(device="cuda:2"))


def test_a_gpu_without_bf16_gets_fp16_or_a_clear_message(two_gpus_without_bf16):
    assert resolve_device(TrainConfig(device="cuda:1")) == (torch.device("cuda:1"), torch.float16)
    with pytest.raises(LoraqError, match="Tesla T4 has no bf16; use --compute-dtype fp16"):
        resolve_device(TrainConfig(device="cuda", compute_dtype="bf16"))


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora"])
def test_the_frozen_base_goes_to_16_bits_and_the_adapter_stays_fp32(tiny, method):
    model, _ = tiny
    frozen_to(model, torch.bfloat16)  # as train does on a GPU, before the adapter exists
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    loraq.apply(model, LoraConfig(r=2, method=method))
    frozen_to(model, torch.bfloat16)  # a model handed in with its adapter: the adapter stays
    constants = quantized_tensor_ids(model)
    for name, p in model.named_parameters():
        expected = torch.float32 if p.requires_grad else torch.bfloat16
        if id(p) in constants:  # codes and constants: exactly as stored (uint8, fp16 scales, fp32 absmax)
            assert p.dtype in (torch.uint8, torch.float16, torch.float32) and not p.requires_grad, name
        else:
            assert p.dtype == expected, name
    if method == "qlora":
        absmax = next(m for m in model.modules() if hasattr(m, "nested_absmax")).nested_absmax
        assert absmax.dtype == torch.float32
    if method == "qalora":
        scale = next(m for m in model.modules() if hasattr(m, "scale") and hasattr(m, "packed")).scale
        assert scale.dtype == torch.float16  # a cast to bf16 would change every weight


def test_without_triton_cuda_takes_the_pytorch_path_with_one_line(monkeypatch, capsys):
    from loraq.quant import frozen

    frozen.cuda_kernels.cache_clear()
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    try:
        assert frozen.cuda_kernels() is None and frozen.cuda_kernels() is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no Triton kernels for the 4-bit layers" in err and "PyTorch path" in err
    finally:
        frozen.cuda_kernels.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(sys.modules["loraq.product.device"], "cpu_supports_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_device(TrainConfig(device="cpu")) == (torch.device("cpu"), expected)
    assert resolve_device(TrainConfig(device="cpu", compute_dtype="fp32"))[1] == torch.float32
