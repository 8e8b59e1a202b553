"""Work buffers belong to whoever trains: lent to one model's frozen layers for a block, freed after, never
shared between models or threads."""

import threading

import pytest
import torch
from test_train import config as train_config

import loraq
from loraq import LoraConfig
from loraq.product.train import _checkpointed_blocks
from loraq.quant import intk, nf4, workspace
from loraq.quant.frozen import FrozenQuantized, IntLinear


def frozen_layers(model):
    return [m for m in model.modules() if isinstance(m, FrozenQuantized)]


def test_attached_lends_one_workspace_per_model_and_frees_it(tiny, tokens):
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=2, method="qlora"))
    with torch.no_grad():
        expected = model(tokens).logits
    with workspace.attached(model) as ws:
        assert all(layer.workspace is ws for layer in frozen_layers(model))
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
        assert ws.nbytes() > 0
    assert all(layer.workspace is None for layer in frozen_layers(model)) and ws.nbytes() == 0
    assert not any(isinstance(v, dict) and v for k, v in vars(workspace).items() if not k.startswith("__"))


def test_two_models_in_two_threads_do_not_share_buffers(tiny_model_dir, tokens):
    """With one process-wide buffer, two threads dequantizing at once overwrite each other's weights."""
    models = []
    for method in ("qlora", "qalora"):
        model, _ = loraq.load_model(tiny_model_dir, method=method)
        with torch.no_grad():
            models.append((model, model(tokens).logits))
    errors = []

    def run(model, expected):
        with workspace.attached(model), torch.no_grad():
            for _ in range(20):
                if not torch.equal(model(tokens).logits, expected):
                    errors.append("mismatch")

    threads = [threading.Thread(target=run, args=pair) for pair in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_training_releases_its_workspace(tmp_path, tiny_model_dir):
    result = loraq.train(train_config(tmp_path, tiny_model_dir, method="qlora", steps=2, eval_every=0), progress=False)
    layers = frozen_layers(result.model)
    assert layers and all(layer.workspace is None for layer in layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, blocksize", [((7, 9), 64), ((40, 96), 32), ((70, 64), 64), ((3, 4096), 4096)])
def test_nf4_into_a_workspace_equals_a_fresh_dequantization(monkeypatch, shape, blocksize, dtype):
    """16-bit outputs are decoded piece by piece (made small here: several pieces, a short last block, an odd
    count): every value the same float operations as the whole-tensor path."""
    monkeypatch.setattr(nf4, "PIECE", 256)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = nf4.quantize_4bit(weight, blocksize, "nf4", double_quant=True)
    ws = workspace.Workspace()
    got = nf4.dequantize_4bit(packed, state, dtype, ws)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, nf4.dequantize_4bit(packed, state, dtype))
    assert torch.equal(got, nf4.dequantize_4bit(packed, state, torch.float32).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape, group", [((37, 64), 32), ((5, 36), 12)])
def test_intk_into_a_workspace_equals_a_fresh_dequantization(monkeypatch, shape, group, bits, dtype):
    """Rows-first codes (in % 8 == 0) decode a few rows at a time; the flat stream (5 x 36) at once."""
    monkeypatch.setattr(intk, "PIECE", 100)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    codes, scale, offset = intk.quantize_rtn(weight, bits, group)
    packed = intk.pack_rows(codes, bits)
    got = intk.dequantize_packed(packed, bits, scale, offset, dtype, workspace.Workspace())
    assert torch.equal(got, intk.dequantize_int(codes, scale, offset, dtype))
    assert torch.equal(got, intk.dequantize_packed(packed, bits, scale, offset, dtype))


def _checkpointed_step(model, tokens, share: bool, dtype=torch.float32) -> tuple[list[torch.Tensor], int]:
    """Gradients of one checkpointed forward and backward, and how many times a frozen layer dequantized."""
    calls = []
    # (an INT-k layer's DoRA weight comes from its constants scaled, through _dequantize, as its plain one)
    name = "_dequantize" if isinstance(frozen_layers(model)[0], IntLinear) else "dequantize"
    for layer in frozen_layers(model):
        setattr(layer, name, (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(getattr(layer, name)))
    model.zero_grad()
    with workspace.attached(model, _checkpointed_blocks(model, torch.bfloat16) if share else ()):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    for layer in frozen_layers(model):
        delattr(layer, name)
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], len(calls)


@pytest.mark.parametrize("method, dora", [("qlora", False), ("qalora", False), ("qlora", True), ("qalora", True)])
def test_checkpointed_backward_reuses_the_recomputed_weight(tiny, tokens, method, dora):
    """With checkpointing, forward + recompute + backward dequantized each layer three times; the backward now
    multiplies by the recompute's weight: two times, and the same gradients bit for bit (with DoRA the weight
    kept is the row-scaled one)."""
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=2, method=method, use_dora=dora))
    if dora:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.normal_(0, 0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = len(frozen_layers(model))
    for dtype in (torch.float32, torch.bfloat16):
        expected, before = _checkpointed_step(model, tokens, share=False, dtype=dtype)
        got, after = _checkpointed_step(model, tokens, share=True, dtype=dtype)
        assert before == 3 * layers and after == 2 * layers
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(layer.checkpoint_slot is None for layer in frozen_layers(model))


def test_sharing_without_checkpointing_fails_loudly(tiny, tokens):
    """A block that is not recomputed would leave the backward a buffer the next block overwrote: autograd's
    version check catches it instead of a wrong gradient."""
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=2, method="qlora"))
    model.train()
    with workspace.attached(model, model.model.layers), pytest.raises(RuntimeError, match="inplace"):
        model(input_ids=tokens, labels=tokens).loss.backward()
