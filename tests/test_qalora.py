import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import loraq
from loraq import LoraConfig, LoraqError
from loraq.core.inject import dequantize_base, lora_layers
from loraq.core.lora import LoraLinear
from loraq.formats.gptq import gptq_tensors, int_layer_from_gptq
from loraq.quant.frozen import IntLinear
from loraq.quant.intk import quantize_rtn
from loraq.quant.schemes.intk import IntRTN


def int_layer(bits=4, group_size=32, out_features=48, in_features=128, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return IntLinear(*quantize_rtn(linear.weight, bits, group_size), bits, linear.bias)


def qalora_layer(bits=4, group_size=32, seed=0):
    layer = LoraLinear(int_layer(bits, group_size, seed=seed))
    layer.add_adapter(LoraConfig(r=4, alpha=8, method="qalora", bits=bits, group_size=group_size))
    layer.set_active("default")
    nn.init.normal_(layer.adapters["default"].B, std=0.05 / group_size)  # sum pooling: inputs L times larger
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
    errors = IntRTN(4, 32).quantize_model(model)
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
    IntRTN(4, 64).quantize_model(model)
    with pytest.raises(
        LoraqError, match="pools groups of 32 input columns .* is INT4 g64: the adapter could not merge"
    ):
        loraq.apply(model, LoraConfig(r=4, method="qalora", group_size=32))


def test_a_group_size_that_does_not_divide_a_layer_is_named(tiny):
    model, _ = tiny
    with pytest.raises(LoraqError, match="--group-size: group size 256 does not divide the input size 64 of layer"):
        IntRTN(4, 256).quantize_model(model)
    with pytest.raises(LoraqError, match="bits"):
        LoraConfig(method="qalora", bits=5)


# --- training, saving, merging and exporting a QA-LoRA run (tiny model, RTN INT4 g32) -------------------


@pytest.fixture(scope="module")
def qalora_run(tmp_path_factory, tiny_model_dir):
    from test_train import config as train_config

    tmp = tmp_path_factory.mktemp("qalora")
    cfg = train_config(tmp, tiny_model_dir, method="qalora", bits=4, group_size=32, steps=8, eval_every=0, lr=2e-3)
    return loraq.train(cfg, progress=False)


def test_qalora_trains_and_saves_its_quantization_report(qalora_run):
    assert qalora_run.val_loss_after < qalora_run.val_loss_before
    layers = lora_layers(qalora_run.model)
    assert all(isinstance(layer.base, IntLinear) for layer in layers.values())
    assert all(layer.adapters["default"].A.shape[1] == layer.in_features // 32 for layer in layers.values())
    report = json.loads((qalora_run.out / "quantization.json").read_text())
    assert len(report["relative_error"]) == 14


def test_saved_adapter_pools_again_on_an_int_base_and_expands_for_peft(qalora_run, tiny_model_dir, tokens):
    adapter = qalora_run.out / "adapter"
    with torch.no_grad():
        trained = qalora_run.model(tokens).logits
    base, _ = loraq.load_model(tiny_model_dir)
    IntRTN(4, 32).quantize_model(base)
    loraq.load_adapter(base, adapter)
    layer = next(iter(lora_layers(base).values()))
    assert layer.adapters["default"].pool == 32 and layer.adapters["default"].A.shape[1] == layer.in_features // 32
    with torch.no_grad():
        torch.testing.assert_close(base(tokens).logits, trained, rtol=0, atol=0)
    # PEFT loads the expanded adapter onto the dequantized INT base and computes the pooled forward
    from peft import PeftModel

    plain, _ = loraq.load_model(tiny_model_dir)
    IntRTN(4, 32).quantize_model(plain)
    dequantize_base(plain)
    peft_model = PeftModel.from_pretrained(plain, adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, trained, rtol=1e-4, atol=1e-4)


def test_an_adapter_for_other_groups_is_refused(qalora_run, tiny_model_dir):
    base, _ = loraq.load_model(tiny_model_dir)
    IntRTN(4, 64).quantize_model(base)
    with pytest.raises(LoraqError, match="pools groups of 32 columns, but layer .* groups of 64"):
        loraq.load_adapter(base, qalora_run.out / "adapter")


def test_merge_to_hf_is_exact_and_gptq_reports_its_rounding(qalora_run, tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    from loraq.product.export import merge_run

    hf = merge_run(qalora_run.out, tmp_path / "hf", dtype="fp32")
    assert hf.error < 1e-3
    assert len(hf.layer_errors) == 14 and max(e for _, e in hf.layer_errors.values()) < 1e-2  # exact to fp16
    assert hf.by_format()["INT4 g32"][0] == 14 and "14 layers in INT4 g32" in str(hf)
    with torch.no_grad():
        expected = qalora_run.model(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(tokens).logits
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-3
    gptq = merge_run(qalora_run.out, tmp_path / "gptq", format="gptq")
    assert gptq.exact_error is not None and gptq.exact_error < gptq.error
    config = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert config["bits"] == 4 and config["group_size"] == 32 and config["sym"] is False and not config["desc_act"]
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj"
    assert tensors[f"{key}.qweight"].shape == (128 * 4 // 32, 64) and tensors[f"{key}.qweight"].dtype == torch.int32
    assert tensors[f"{key}.qzeros"].shape == (128 // 32, 64 * 4 // 32)
    assert tensors[f"{key}.scales"].shape == (4, 64) and tensors[f"{key}.g_idx"].tolist() == [
        i // 32 for i in range(128)
    ]
    peft = merge_run(qalora_run.out, tmp_path / "peft", format="peft")
    assert peft.error < 1e-4


def test_gptq_tensors_round_trip_the_codes_and_scales():
    layer = int_layer(bits=4, seed=3)
    tensors, weight = gptq_tensors(layer)
    back = int_layer_from_gptq(tensors, 4, 32)
    assert torch.equal(back.codes(), layer.codes()) and torch.equal(back.scale, layer.scale)
    torch.testing.assert_close(back.dequantize(), weight, rtol=1e-3, atol=1e-4)
    with pytest.raises(LoraqError, match="GPTQ export supports 2, 4, 8 bits, not 3"):
        gptq_tensors(int_layer(bits=3))


def test_gptq_quantizer_run(tmp_path, tiny_model_dir):
    from test_train import config as train_config

    cfg = train_config(tmp_path, tiny_model_dir, method="qalora", quantizer="gptq", bits=3, steps=2, eval_every=0)
    result = loraq.train(cfg, progress=False)
    assert all(layer.base.bits == 3 for layer in lora_layers(result.model).values())
    assert (tmp_path / "run" / "quantization.json").is_file()


# --- the pooling scale ------------------------------------------------------------------------------------


def test_sum_pooling_is_mean_pooling_with_alpha_times_the_group_under_adam():
    """Same forward and the same Adam steps: the pooling scale is a learning-rate factor, nothing else."""
    torch.manual_seed(0)
    x, target = torch.randn(16, 128), torch.randn(16, 48)
    outputs = []
    for pooling, alpha in (("sum", 8.0), ("mean", 8.0 * 32)):
        torch.manual_seed(1)
        layer = LoraLinear(int_layer())
        layer.add_adapter(LoraConfig(r=4, alpha=alpha, method="qalora", pooling=pooling))
        layer.set_active("default")
        optimizer = torch.optim.AdamW(layer.adapters.parameters(), lr=1e-3)
        for _ in range(5):
            loss = ((layer(x) - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            outputs.append(layer(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def test_sum_pooling_trains_group_size_times_faster_than_mean():
    """The first Adam step moves each A entry by ~lr either way; the effect on the output is L times larger."""
    changes = []
    for pooling in ("sum", "mean"):
        torch.manual_seed(1)
        layer = LoraLinear(int_layer())
        layer.add_adapter(LoraConfig(r=4, alpha=8, method="qalora", pooling=pooling))
        layer.set_active("default")
        nn.init.normal_(layer.adapters["default"].B, std=0.05)
        x = torch.randn(16, 128)
        with torch.no_grad():
            before = layer(x)
        optimizer = torch.optim.Adam([layer.adapters["default"].A], lr=1e-3, eps=1e-15)  # eps: no damping
        (layer(x) * torch.linspace(-1, 1, 48)).sum().backward()  # a loss whose gradient does not depend on y
        optimizer.step()
        with torch.no_grad():
            changes.append(float((layer(x) - before).abs().mean()))
    assert changes[0] / changes[1] == pytest.approx(32, rel=0.05)


def legacy_adapter(folder):
    """Strip what loraq writes since sum pooling, leaving the metadata of an adapter saved before it."""
    from safetensors.torch import save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(tensors, str(path), metadata={"format": "pt", "loraq_qalora_group_size": "32"})


def test_an_adapter_saved_before_sum_pooling_computes_what_it_did(tiny, tokens, tmp_path):
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=4, alpha=8, method="qalora", pooling="mean"))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.adapters["default"].B, std=0.05)
    with torch.no_grad():
        expected = model(tokens).logits
    loraq.save_adapter(model, tmp_path / "old")
    legacy_adapter(tmp_path / "old")
    base = loraq.unload(model)
    loraq.load_adapter(base, tmp_path / "old")
    assert next(iter(lora_layers(base).values())).adapters["default"].pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(base(tokens).logits, expected, rtol=0, atol=0)


def test_the_adapter_metadata_says_which_pooling_it_uses(tiny, tmp_path):
    from safetensors import safe_open

    model, _ = tiny
    loraq.apply(model, LoraConfig(r=2, method="qalora"))
    loraq.save_adapter(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["loraq_qalora_group_size"] == "32" and meta["loraq_qalora_pooling"] == "sum"


# --- group-constant training ------------------------------------------------------------------------------


def constants_layer(train="both", r=4):
    layer = LoraLinear(int_layer(bias=True))
    layer.add_adapter(LoraConfig(r=r, alpha=8, method="qalora", train_constants=train))
    layer.set_active("default")
    adapter = layer.adapters["default"]
    torch.manual_seed(5)
    for p in (adapter.gamma, adapter.delta):
        if p is not None:
            nn.init.normal_(p, std=0.1)
    if r:
        nn.init.normal_(adapter.B, std=0.05)
    return layer


@pytest.mark.parametrize("train", ["scale", "offset", "both"])
def test_trained_constants_compute_and_differentiate_like_the_dequantized_weight(train):
    layer = constants_layer(train, r=0)
    adapter, base = layer.adapters["default"], layer.base
    x = torch.randn(2, 7, 128, requires_grad=True)
    y = layer(x)
    # reference: the weight written out with ordinary autograd ops
    codes = base.codes().view(48, 4, 32).float()
    scale, offset = base.scale.float().unsqueeze(2), base.offset.float().unsqueeze(2)
    gamma = adapter.gamma.unsqueeze(2) if adapter.gamma is not None else 0.0
    delta = adapter.delta.unsqueeze(2) if adapter.delta is not None else 0.0
    weight = (codes * (scale * (1 + gamma)) + (offset + scale * delta)).reshape(48, 128)
    x2 = x.detach().clone().requires_grad_(True)
    reference = nn.functional.linear(x2, weight, base.bias)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    ours = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.zero_grad()
    reference.backward(grad)
    for name, p in adapter.named_parameters():
        if name in ("gamma", "delta"):
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert base.scale.grad is None and not any(b.requires_grad for b in base.buffers())


@pytest.mark.parametrize("train, r", [("both", 4), ("offset", 0), ("scale", 4)])
def test_trained_constants_merge_exactly_into_the_groups(train, r):
    layer = constants_layer(train, r)
    codes = layer.base.codes().clone()
    x = torch.randn(32, 128)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        after = layer.base(x)
    assert torch.equal(layer.base.codes(), codes)
    assert float((after - before).abs().max() / before.abs().max()) <= 2e-3  # fp16 constants
    with torch.no_grad():
        layer.unmerge()
        torch.testing.assert_close(layer(x), before, rtol=2e-3, atol=2e-3)


def test_optimizer_state_only_for_what_trains(tiny):
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=0, method="qalora", train_constants="offset"))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad and p.numel()}
    assert trainable == {"delta"}
    summary = loraq.parameter_summary(model)
    assert summary.trainable == sum(m.out_features * m.in_features // 32 for m in lora_layers(model).values())


@pytest.fixture(scope="module")
def constants_run(tmp_path_factory, tiny_model_dir):
    from test_train import config as train_config

    tmp = tmp_path_factory.mktemp("constants")
    cfg = train_config(
        tmp, tiny_model_dir, method="qalora", train_constants="both", steps=6, eval_every=0, save_every=3
    )
    return loraq.train(cfg, progress=False)


def test_a_constants_run_trains_saves_reloads_and_exports_gguf_exactly(constants_run, tiny_model_dir, tokens):
    assert constants_run.val_loss_after < constants_run.val_loss_before
    adapter = constants_run.out / "adapter"
    assert (adapter / "group_constants.safetensors").is_file()
    with torch.no_grad():
        trained = constants_run.model(tokens).logits
    base, _ = loraq.load_model(tiny_model_dir, method="qalora")
    loraq.load_adapter(base, adapter)
    with torch.no_grad():
        torch.testing.assert_close(base(tokens).logits, trained, rtol=0, atol=0)
        merged = loraq.merge(base)
        error = (merged(tokens).logits - trained).abs()
    assert float(error.mean()) < 2e-3 and float(error.max()) < 2e-2  # the fp16 rounding of scale and offset


def test_exports_that_cannot_hold_trained_constants_are_refused_up_front(constants_run, tmp_path):
    from loraq.product.export import merge_run

    for fmt, why in (("peft", "a LoRA adapter cannot hold them"), ("gptq", "integer zero points cannot hold")):
        with pytest.raises(LoraqError, match=f"--format {fmt} cannot hold .*--train-constants both.*{why}"):
            merge_run(constants_run.out, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()


def test_constants_need_qalora_and_rank_zero_needs_constants():
    with pytest.raises(LoraqError, match="--train-constants offset.* needs --method qalora, not qlora"):
        LoraConfig(method="qlora", train_constants="offset")
    with pytest.raises(
        LoraqError, match=r"r \(--rank\) must be a positive integer \(0 only with --train-constants or --dora\)"
    ):
        LoraConfig(r=0, method="qalora")
    with pytest.raises(LoraqError, match="pooling .* must be sum or mean"):
        LoraConfig(method="qalora", pooling="max")
