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
