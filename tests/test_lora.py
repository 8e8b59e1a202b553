import math

import pytest
import torch
from torch import nn

from loraq import LoraConfig, LoraqError
from loraq.core.lora import LoraLinear


def make_layer(in_f=32, out_f=24, bias=True, **kw):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(in_f, out_f, bias=bias))
    layer.add_adapter(LoraConfig(**{"r": 4, "alpha": 8, **kw}))
    layer.set_active("default")
    return layer


def randomize_b(layer, name="default"):
    with torch.no_grad():
        layer.adapters[name].B.normal_()


def test_fresh_adapter_is_identity():
    layer = make_layer()
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), layer.base(x))


def test_forward_matches_formula():
    layer = make_layer()
    randomize_b(layer)
    a = layer.adapters["default"]
    x = torch.randn(3, 32)
    expected = layer.base(x) + 2.0 * x @ a.A.T @ a.B.T
    torch.testing.assert_close(layer(x), expected)


def test_merge_and_unmerge_roundtrip():
    layer = make_layer()
    randomize_b(layer)
    x = torch.randn(7, 32)
    w0 = layer.base.weight.clone()
    y = layer(x)
    layer.merge()
    assert layer.merged == "default"
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    assert not torch.equal(layer.base.weight, w0)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_kaiming_init_bound():
    layer = make_layer(in_f=256)
    a = layer.adapters["default"].A
    bound = 1 / math.sqrt(256)  # kaiming-uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.adapters["default"].B) == 0


def test_gaussian_init_std():
    layer = make_layer(in_f=4096, init="gaussian", r=8)
    assert layer.adapters["default"].A.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    randomize_b(layer)
    x = torch.randn(4, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_bias_stays_frozen_and_untouched_by_merge():
    layer = make_layer()
    randomize_b(layer)
    b = layer.base.bias.clone()
    layer.merge()
    assert torch.equal(layer.base.bias, b)


def test_named_adapters_switch():
    layer = make_layer()
    layer.add_adapter(LoraConfig(r=2, alpha=2, adapter_name="other"))
    randomize_b(layer, "default")
    randomize_b(layer, "other")
    x = torch.randn(2, 32)
    y_default = layer(x)
    layer.set_active("other")
    assert not torch.allclose(layer(x), y_default)
    with pytest.raises(LoraqError, match="no adapter named 'nope'"):
        layer.set_active("nope")
    with pytest.raises(LoraqError, match="already exists"):
        layer.add_adapter(LoraConfig(adapter_name="other"))


def test_merge_in_float32_then_cast_for_half_base():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 64).to(torch.bfloat16))
    layer.add_adapter(LoraConfig(r=4, alpha=8))
    layer.set_active("default")
    randomize_b(layer)
    w0 = layer.base.weight.float().clone()
    expected = (w0 + layer.adapters["default"].delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert layer.base.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base.weight, expected)


def test_gradients_only_on_adapter():
    layer = make_layer()
    layer.base.requires_grad_(False)
    randomize_b(layer)
    layer(torch.randn(3, 32)).sum().backward()
    a = layer.adapters["default"]
    assert a.A.grad is not None and a.B.grad is not None
    assert layer.base.weight.grad is None


@pytest.mark.skipif(not __import__("loraq.product.device", fromlist=["x"]).cpu_supports_bf16(), reason="no bf16")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_under_autocast_adapters_keep_the_16_bit_input_itself_for_backward(method):
    """On a GPU the frozen base is 16-bit and so is the input of q, k and v: their adapters must keep that very
    tensor for backward, not each a copy cast to fp32 and back (DESIGN.md §11)."""
    import loraq

    torch.manual_seed(0)
    model = nn.ModuleDict({"q_proj": nn.Linear(64, 48), "k_proj": nn.Linear(64, 16)})
    loraq.apply(model, loraq.LoraConfig(r=4, targets="all-linear", method=method))
    leaf = torch.randn(32, 64, requires_grad=True)
    x = (leaf * 1.0).bfloat16()  # an activation in 16 bits, as the normed input of a block on a GPU
    kept: set[int] = set()

    def pack(t):
        if t.numel() == x.numel():  # the layer's input, or a copy of it
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model["q_proj"](x).float().sum() + model["k_proj"](x).float().sum()
    y.backward()
    assert kept == {x.untyped_storage().data_ptr()}
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
