import re

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import loraq
from loraq import LoraConfig, LoraqError
from loraq.core.inject import find_targets, lora_layers

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_all_linear_targets_every_projection_not_the_head(tiny):
    model, _ = tiny
    names = find_targets(model, "all-linear")
    assert len(names) == 2 * 7
    assert all(n.rsplit(".", 1)[-1] in PROJECTIONS for n in names)
    assert "lm_head" not in names


def test_suffix_and_regex_targets(tiny):
    model, _ = tiny
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(model, r".*layers\.1\..*_proj") == [n for n in find_targets(model, "all-linear") if ".1." in n]


def test_unknown_target_lists_existing_layers(tiny):
    model, _ = tiny
    with pytest.raises(LoraqError) as e:
        loraq.apply(model, LoraConfig(targets=["q_prj"]))
    msg = str(e.value)
    assert "'q_prj'" in msg and "did you mean 'q_proj'" in msg
    assert all(p in msg for p in PROJECTIONS)
    with pytest.raises(LoraqError, match="matches no linear layer"):
        loraq.apply(model, LoraConfig(targets="nothing.*"))


def test_apply_freezes_base_and_counts_match_peft(tiny_model_dir):
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        ours, _ = loraq.load_model(tiny_model_dir)
        theirs, _ = loraq.load_model(tiny_model_dir)
        loraq.apply(ours, LoraConfig(r=8, alpha=16, targets=targets))
        peft_model = get_peft_model(theirs, PeftLoraConfig(r=8, lora_alpha=16, target_modules=targets))
        trainable, total = peft_model.get_nb_trainable_parameters()
        summary = loraq.parameter_summary(ours)
        assert (summary.trainable, summary.total) == (trainable, total)
        assert all(("adapters." in n) == p.requires_grad for n, p in ours.named_parameters())


def test_apply_leaves_outputs_unchanged_then_merge_keeps_them(tiny, tokens):
    model, _ = tiny
    base = logits(model, tokens)
    loraq.apply(model, LoraConfig(r=4, alpha=8))
    torch.testing.assert_close(logits(model, tokens), base)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.adapters["default"].B, std=0.1)
    adapted = logits(model, tokens)
    assert not torch.allclose(adapted, base)
    with loraq.disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base)
    merged = loraq.merge(model)
    assert not lora_layers(merged)
    assert all(type(m).__name__ != "LoraLinear" for m in merged.modules())
    torch.testing.assert_close(logits(merged, tokens), adapted, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_per_layer_and_unload(tiny, tokens):
    model, _ = tiny
    base = logits(model, tokens)
    loraq.apply(model, LoraConfig(r=4, alpha=8))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.adapters["default"].B, std=0.1)
    adapted = logits(model, tokens)
    for layer in lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(logits(model, tokens), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(LoraqError, match="unmerge first"), loraq.disable_adapters(model):
        pass
    loraq.unload(model)
    torch.testing.assert_close(logits(model, tokens), base, atol=1e-5, rtol=1e-5)


def test_two_named_adapters_one_active(tiny, tokens):
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    loraq.apply(model, LoraConfig(r=2, alpha=2, targets=["q_proj", "v_proj"], adapter_name="second"))
    for layer in lora_layers(model).values():
        for a in layer.adapters.values():
            torch.nn.init.normal_(a.B, std=0.1)
    first = logits(model, tokens)
    assert [layer.active for layer in lora_layers(model).values()] == ["default", None] * 2
    loraq.set_active_adapter(model, "second")
    second = logits(model, tokens)
    assert not torch.allclose(first, second)
    assert [layer.active for layer in lora_layers(model).values()] == ["second"] * 4
    loraq.set_active_adapter(model, "default")
    assert [layer.active for layer in lora_layers(model).values()] == ["default", None] * 2
    torch.testing.assert_close(logits(model, tokens), first)
    with pytest.raises(LoraqError, match=re.escape("no adapter named 'third'")):
        loraq.set_active_adapter(model, "third")


# --- the method decides the base ----------------------------------------------------------------------------


@pytest.mark.parametrize("method, kind", [("qlora", "NF4Linear"), ("qalora", "IntLinear")])
def test_apply_builds_the_base_the_method_names(tiny, tokens, method, kind):
    model, _ = tiny
    fp32_bytes = sum(p.numel() * 4 for p in model.model.layers.parameters())
    loraq.apply(model, LoraConfig(r=4, method=method, targets=["q_proj", "v_proj"]))
    layers = lora_layers(model)
    assert len(layers) == 4 and all(type(layer.base).__name__ == kind for layer in layers.values())
    # every linear layer but the head is quantized, as `loraq train --method` does: the memory is the point
    assert type(model.model.layers[0].mlp.up_proj).__name__ == kind
    assert type(model.lm_head).__name__ == "Linear"
    layer_bytes = sum(t.numel() * t.element_size() for t in model.model.layers.state_dict().values())
    assert layer_bytes < 0.45 * fp32_bytes
    assert torch.isfinite(logits(model, tokens)).all()


def test_apply_keeps_a_base_already_in_the_methods_format(tiny):
    model, _ = tiny
    loraq.quantize(model, LoraConfig(method="qlora", quantizer="fp4"))
    before = model.model.layers[0].self_attn.q_proj.packed.clone()
    loraq.apply(model, LoraConfig(r=2, method="qlora", quantizer="fp4"))
    assert torch.equal(lora_layers(model)["model.layers.0.self_attn.q_proj"].base.packed, before)


def test_apply_refuses_a_base_of_another_format(tiny):
    model, _ = tiny
    loraq.quantize(model, LoraConfig(method="qalora"))
    with pytest.raises(
        LoraqError, match="method qlora trains on an NF4\\+DQ blocksize 64 base, but layer .* is INT4 g32"
    ):
        loraq.apply(model, LoraConfig(method="qlora"))


def test_gptq_needs_calibration_and_names_the_function_that_takes_it(tiny, tokens):
    model, _ = tiny
    with pytest.raises(LoraqError, match=r"needs calibration data; quantize the model with loraq\.quantize\("):
        loraq.apply(model, LoraConfig(method="qalora", quantizer="gptq"))
    assert not lora_layers(model)  # nothing changed
    batches = [{"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}]
    errors = loraq.quantize(model, LoraConfig(method="qalora", quantizer="gptq"), calibration=batches)
    assert len(errors) == 14 and all(0 < e < 0.2 for e in errors.values())
    loraq.apply(model, LoraConfig(r=2, method="qalora", quantizer="gptq"))
    assert len(lora_layers(model)) == 14


def test_load_model_with_a_method_quantizes_while_loading(tiny_model_dir, tokens):
    model, _ = loraq.load_model(tiny_model_dir, method="qlora")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "NF4Linear"
    model, _ = loraq.load_model(tiny_model_dir, method=LoraConfig(method="qalora", bits=3, group_size=16))
    layer = model.model.layers[0].self_attn.o_proj
    assert (layer.bits, layer.group_size) == (3, 16)
    with pytest.raises(LoraqError, match="loraq.quantize"):
        loraq.load_model(tiny_model_dir, method=LoraConfig(method="qalora", quantizer="gptq"))


def test_a_model_without_linear_layers_is_told_what_it_has():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.norm = torch.nn.LayerNorm(4)

    with pytest.raises(LoraqError, match="no nn.Linear or Conv1D layer .* its layers are Embedding, LayerNorm"):
        loraq.apply(Tiny(), LoraConfig())
