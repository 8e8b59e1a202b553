import sys

import pytest
import torch
from test_train import config as train_config
from torch import nn

import loraq
from loraq import LoraConfig, LoraqError
from loraq.core.inject import lora_layers
from loraq.core.lora import LoraLinear
from loraq.quant.frozen import NF4Linear
from loraq.quant.schemes.nf4 import NF4
from loraq.quant.workspace import Workspace


def nf4_layer(linear: nn.Linear) -> NF4Linear:
    return NF4().quantize_layer("", linear.weight.detach(), None if linear.bias is None else linear.bias.detach())


def test_nf4_linear_forward_and_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(96, 48)
    q = nf4_layer(linear)
    w = q.dequantize()
    x = torch.randn(5, 96, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.T + linear.bias, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ w, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())
    assert q.storage_bytes() * 8 / w.numel() == pytest.approx(4.127, abs=0.05)


def test_qlora_equals_lora_on_the_dequantized_weight():
    torch.manual_seed(0)
    q = nf4_layer(nn.Linear(128, 64, bias=False))
    plain = nn.Linear(128, 64, bias=False)
    plain.weight.data = q.dequantize()
    a, b = LoraLinear(q), LoraLinear(plain)
    for layer in (a, b):
        torch.manual_seed(1)
        layer.add_adapter(LoraConfig(r=4, alpha=8))
        layer.set_active("default")
        nn.init.normal_(layer.adapters["default"].B)
    x = torch.randn(3, 128)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    for name in ("A", "B"):
        torch.testing.assert_close(getattr(a.adapters["default"], name).grad, getattr(b.adapters["default"], name).grad)
    with pytest.raises(LoraqError, match="loraq.merge"):
        a.merge()


def test_gradients_reach_every_lora_parameter_after_generate(tiny):
    """The bitsandbytes CPU trap: after a no-grad generate() a 4-bit layer must still pass input gradients."""
    model, tok = tiny
    total = loraq.parameter_summary(model).total
    NF4().quantize_model(model)
    loraq.apply(model, LoraConfig(r=4, alpha=8))
    summary = loraq.parameter_summary(model)
    assert summary.total == total + summary.trainable
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.adapters["default"].B, std=0.01)
    loraq.generate(model, tok, "name: The Mill", max_new_tokens=3)
    model.train()
    ids = torch.randint(3, len(tok), (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_qlora_training_adapter_and_merge(tmp_path, tiny_model_dir, tokens):
    cfg = train_config(tmp_path, tiny_model_dir, method="qlora", steps=6, warmup_steps=1, eval_every=0)
    result = loraq.train(cfg, progress=False)
    assert result.val_loss_after < result.val_loss_before
    assert all(isinstance(layer.base, NF4Linear) for layer in lora_layers(result.model).values())
    with torch.no_grad():
        adapted = result.model(tokens).logits
    merged = loraq.merge(result.model)
    assert not any(isinstance(m, (NF4Linear, LoraLinear)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted, rtol=1e-4, atol=1e-4)
    # the adapter is a plain PEFT adapter that loads onto the original full-precision base
    base, _ = loraq.load_model(tiny_model_dir)
    loraq.load_adapter(base, tmp_path / "run" / "adapter")
    assert len(lora_layers(base)) == 14


def test_grad_checkpoint_gives_the_same_losses(tmp_path, tiny_model_dir):
    plain = loraq.train(
        train_config(tmp_path / "a", tiny_model_dir, method="qlora", steps=3, eval_every=0), progress=False
    )
    checkpointed = loraq.train(
        train_config(tmp_path / "b", tiny_model_dir, method="qlora", steps=3, eval_every=0, grad_checkpoint=True),
        progress=False,
    )
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.model.modules())
    assert checkpointed.train_losses == pytest.approx(plain.train_losses, rel=1e-5)


def test_bf16_compute_follows_autocast_and_keeps_adapters_fp32(tiny):
    model, tok = tiny
    NF4().quantize_model(model)
    loraq.apply(model, LoraConfig(r=4, alpha=8))
    ids = torch.randint(3, len(tok), (2, 10))
    seen = []
    layer = model.model.layers[0].self_attn.q_proj.base
    layer.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert seen and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_on_a_cpu_without_it_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sys.modules["loraq.product.device"], "cpu_supports_bf16", lambda: False)
    with pytest.raises(LoraqError, match="no native bf16 support"):
        loraq.train(train_config(tmp_path, tiny_model_dir, device="cpu", compute_dtype="bf16"), progress=False)
    with pytest.raises(LoraqError, match="fp16 needs CUDA"):
        loraq.train(train_config(tmp_path, tiny_model_dir, device="cpu", compute_dtype="fp16"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(LoraqError, match="no CUDA device"):
            loraq.train(train_config(tmp_path, tiny_model_dir, device="cuda"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shape", [(64, 96), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_work_buffers_give_the_same_weight_and_are_reused(shape, dtype):
    from loraq.quant.frozen import IntLinear
    from loraq.quant.intk import quantize_rtn

    torch.manual_seed(0)
    nf4 = nf4_layer(nn.Linear(shape[1], shape[0]))
    layers = [nf4]
    if shape[1] % 32 == 0:
        layers.append(IntLinear(*quantize_rtn(torch.randn(shape), 4, 32), 4))
    workspace = Workspace()
    for layer in layers:
        fresh = layer.dequantize(dtype)
        reused = layer.dequantize(dtype, workspace)
        assert torch.equal(fresh, reused)
        assert layer.dequantize(dtype, workspace).data_ptr() == reused.data_ptr()  # no new allocation
        assert layer.dequantize(dtype).data_ptr() != fresh.data_ptr()
