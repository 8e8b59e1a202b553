"""GPT-2-family models (transformers' Conv1D, weight stored (in, out)): LoRA, QLoRA and QA-LoRA on them, merging,
and the PEFT round trip in both directions (PEFT's fan_in_fan_out)."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import loraq
from loraq import LoraConfig
from loraq.core.inject import find_targets, lora_layers
from loraq.core.layers import is_conv1d, layer_shape, linear_weight


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def gpt2_tokens():
    torch.manual_seed(1)
    return torch.randint(0, 300, (2, 10))


def randomize(model):
    torch.manual_seed(2)
    for layer in lora_layers(model).values():
        for adapter in layer.adapters.values():
            torch.nn.init.normal_(adapter.B, std=0.1)


def test_conv1d_is_a_linear_layer_of_its_transposed_shape():
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    assert is_conv1d(c_attn) and layer_shape(c_attn) == (192, 64)
    assert linear_weight(c_attn).shape == (192, 64)
    names = find_targets(model, "all-linear")
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"} and len(names) == 8


def test_lora_on_gpt2_trains_merges_and_unmerges(gpt2_tokens):
    model = tiny_gpt2()
    before = logits(model, gpt2_tokens)
    loraq.apply(model, LoraConfig(r=4, alpha=8))
    torch.testing.assert_close(logits(model, gpt2_tokens), before)  # B = 0: unchanged
    randomize(model)
    adapted = logits(model, gpt2_tokens)
    assert not torch.allclose(adapted, before, atol=1e-3)
    loss = model(gpt2_tokens, labels=gpt2_tokens).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    layer.merge()
    torch.testing.assert_close(logits(model, gpt2_tokens), adapted, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    torch.testing.assert_close(logits(model, gpt2_tokens), adapted, rtol=1e-4, atol=1e-4)
    merged = loraq.merge(model)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(logits(merged, gpt2_tokens), adapted, rtol=1e-4, atol=1e-4)


def test_loraq_adapter_loads_in_peft_with_the_same_logits(gpt2_tokens, tmp_path):
    model = tiny_gpt2()
    loraq.apply(model, LoraConfig(r=4, alpha=8))
    randomize(model)
    expected = logits(model, gpt2_tokens)
    loraq.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model, gpt2_tokens), expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_loraq_with_the_same_logits(gpt2_tokens, tmp_path):
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft_model = get_peft_model(tiny_gpt2(), config)
    torch.manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    expected = logits(peft_model, gpt2_tokens)
    peft_model.save_pretrained(tmp_path / "peft")
    model = loraq.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert len(lora_layers(model)) == 8
    torch.testing.assert_close(logits(model, gpt2_tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_quantized_methods_on_gpt2_quantize_the_transposed_weight(gpt2_tokens, method):
    model = tiny_gpt2()
    weight = linear_weight(model.transformer.h[1].mlp.c_fc).detach().clone()
    loraq.apply(model, LoraConfig(r=4, alpha=8, method=method, group_size=32))
    base = lora_layers(model)["transformer.h.1.mlp.c_fc"].base
    assert (base.out_features, base.in_features) == tuple(weight.shape)
    assert float((base.dequantize() - weight).norm() / weight.norm()) < 0.12
    randomize(model)
    adapted = logits(model, gpt2_tokens)
    merged = loraq.merge(model)
    tolerance = 2e-3 if method == "qalora" else 1e-4  # qalora merges into fp16 offsets
    torch.testing.assert_close(logits(merged, gpt2_tokens), adapted, rtol=tolerance, atol=tolerance)
