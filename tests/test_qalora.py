import pytest
import torch
from torch import nn

import loraq
from loraq import LoraConfig, LoraqError
from loraq.inject import lora_layers
from loraq.lora import LoraLinear
from loraq.quant.intk import quantize_rtn
from loraq.quant.linear import IntLinear, quantize_model_int


def int_layer(bits=4, group_size=32, out_features=48, in_features=128, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return IntLinear(*quantize_rtn(linear.weight, bits, group_size), bits, linear.bias)


def qalora_layer(bits=4, group_size=32, seed=0):
    layer = LoraLinear(int_layer(bits, group_size, seed=seed))
    layer.add_adapter(LoraConfig(r=4, alpha=8, method="qalora", bits=bits, group_size=group_size))
    layer.set_active("default")
    nn.init.normal_(layer.adapters["default"].B, std=0.05)
    return layer


def test_pooled_adapter_equals_its_expanded_plain_lora():
    layer = qalora_layer()
    adapter = layer.adapters["default"]
    assert adapter.A.shape == (4, 128 // 32)
    x = torch.randn(3, 5, 128)
    plain = nn.functional.linear(nn.functional.linear(x, adapter.expanded_A()), adapter.B) * adapter.scaling
    torch.testing.assert_close(adapter(x), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.delta_weight(), adapter.B @ adapter.expanded_A() * adapter.scaling)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group_size", [32, 64])
def test_merge_into_offsets_is_exact_to_fp16_rounding(bits, group_size):
    layer = qalora_layer(bits, group_size)
    codes = layer.base.codes().clone()
    x = torch.randn(64, 128)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        after = layer.base(x)
    assert torch.equal(layer.base.codes(), codes)  # codes untouched: same size, same format
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-3
    with torch.no_grad():
        layer.unmerge()
        torch.testing.assert_close(layer(x), before, rtol=1e-3, atol=1e-3)


def test_gradients_flow_to_both_factors_and_never_to_the_base():
    layer = qalora_layer()
    layer(torch.randn(4, 128)).square().sum().backward()
    adapter = layer.adapters["default"]
    assert adapter.A.grad is not None and adapter.B.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in layer.base.parameters())


def test_model_level_apply_merge_and_parameter_counts(tiny, tokens):
    model, _ = tiny
    errors = quantize_model_int(model, bits=4, group_size=32)
    assert len(errors) == 14 and max(errors.values()) < 0.2
    loraq.apply(model, LoraConfig(r=4, alpha=8, method="qalora", group_size=32))
    qalora_trainable = loraq.parameter_summary(model).trainable
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.adapters["default"].B, std=0.05)
    with torch.no_grad():
        before = model(tokens).logits
        loraq.merge(model)
        after = model(tokens).logits
    assert sum(isinstance(m, IntLinear) for m in model.modules()) == 14  # still INT4
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-3
    lora_model = type(model)(model.config)
    loraq.apply(lora_model, LoraConfig(r=4, alpha=8))
    assert qalora_trainable < loraq.parameter_summary(lora_model).trainable


def test_pooling_must_match_the_quantization_groups(tiny):
    model, _ = tiny
    with pytest.raises(LoraqError, match="needs an INT-k quantized base"):
        loraq.apply(model, LoraConfig(r=4, method="qalora", group_size=32))
    quantize_model_int(model, bits=4, group_size=64)
    with pytest.raises(LoraqError, match="pooling window 32 .* groups of 64"):
        loraq.apply(model, LoraConfig(r=4, method="qalora", group_size=32))


def test_a_group_size_that_does_not_divide_a_layer_is_named(tiny):
    model, _ = tiny
    with pytest.raises(LoraqError, match="--group-size: group size 256 does not divide the input size 64 of layer"):
        quantize_model_int(model, bits=4, group_size=256)
    with pytest.raises(LoraqError, match="bits"):
        LoraConfig(method="qalora", bits=5)
