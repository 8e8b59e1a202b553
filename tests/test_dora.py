"""DoRA (use_dora): PEFT's numbers both ways, on every base loraq trains; exact merges into 16-bit and INT-k
bases, unmerge bit-exact; magnitude-only adapters; the options that cannot hold it refused by name."""

import copy

import pytest
import torch
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model
from test_layers import tiny_gpt2

import loraq
from loraq import LoraqError
from loraq.core.inject import dequantize_base, lora_layers
from loraq.quant.frozen import IntLinear


def randomize(model, seed: int = 0, scale: float = 0.05) -> None:
    """Give every trainable tensor (A, B and the magnitudes) values away from its start, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * scale
                p.add_(noise * p.abs().mean() * 10) if "magnitude" in name else p.copy_(noise)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def close(a, b, tol=1e-5) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora"])
def test_loraq_dora_loads_into_peft_with_the_same_logits(tiny_model_dir, tokens, tmp_path, method):
    """loraq -> PEFT, on the weight loraq's base computes with (dequantized for 4-bit bases: the same math)."""
    model, _ = loraq.load_model(tiny_model_dir)
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, method=method, use_dora=True))
    randomize(model)
    loraq.save_adapter(model, tmp_path / "ad")
    reference = dequantize_base(copy.deepcopy(loraq.unload(copy.deepcopy(model))))
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "ad").eval()
    assert close(logits(model.eval(), tokens), logits(peft_model, tokens))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_dora_loads_into_loraq_with_the_same_logits(tiny_model_dir, family, tmp_path):
    """PEFT -> loraq, on the tiny Llama and on GPT-2 (Conv1D, fan_in_fan_out), in eval and in training mode
    with dropout (the same random mask: one dropout call per layer, as PEFT's training formula)."""
    if family == "llama":
        base, _ = loraq.load_model(tiny_model_dir)
        targets, fan = ["q_proj", "v_proj", "down_proj"], False
    else:
        base, targets, fan = tiny_gpt2(), ["c_attn", "c_proj", "c_fc"], True
    tokens = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    config = PeftConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, lora_dropout=0.2, fan_in_fan_out=fan)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path / "ad")
    ours = loraq.load_adapter(base, tmp_path / "ad")
    assert close(logits(ours.eval(), tokens), logits(peft_model.eval(), tokens))
    ours.train(), peft_model.train()
    torch.manual_seed(5)
    want = peft_model(tokens).logits
    torch.manual_seed(5)
    got = ours(tokens).logits
    assert close(got, want)


def test_a_fresh_dora_adapter_changes_nothing_and_trains_the_magnitudes(tiny, tokens):
    model, _ = tiny
    before = logits(model, tokens)
    loraq.apply(model, loraq.LoraConfig(r=4, method="qalora", use_dora=True))
    quantized = loraq.unload(copy.deepcopy(model))
    assert close(logits(model, tokens), logits(quantized, tokens), 1e-6)
    assert not close(before, logits(quantized, tokens), 1e-3)  # (the INT4 base itself differs from fp32)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"magnitude", "B"} <= names  # (A's gradient is zero while B is)


def test_dora_merges_exactly_into_int4_offsets_and_scales(tiny, tokens):
    """scale' = k·scale, offset' = k·(offset + Δ): codes byte-identical, logits as trained (fp16 constants);
    unmerge restores the constants bit for bit (kept, not divided)."""
    model, _ = tiny
    loraq.apply(model, loraq.LoraConfig(r=4, method="qalora", use_dora=True))
    randomize(model, seed=3)
    trained = logits(model, tokens)
    layers = lora_layers(model)
    before = {n: (x.base.packed.clone(), x.base.scale.clone(), x.base.offset.clone()) for n, x in layers.items()}
    for layer in layers.values():
        assert layer.merges_in_format()
        layer.merge()
    assert close(logits(model, tokens), trained, 1e-3)
    for name, layer in layers.items():
        packed, scale, offset = before[name]
        assert torch.equal(layer.base.packed, packed) and not torch.equal(layer.base.scale, scale)
        layer.unmerge()
        assert torch.equal(layer.base.scale, scale) and torch.equal(layer.base.offset, offset)
    assert close(logits(model, tokens), trained, 1e-6)
    merged = loraq.merge(model)
    assert all(isinstance(merged.get_submodule(n), IntLinear) for n in layers)
    assert close(logits(merged, tokens), trained, 1e-3)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dora_merge_into_16_bits(tiny, tokens, method):
    """A full-precision base takes W' = k·(W0 + ΔW) in place (unmerge exact); NF4 cannot hold it and
    loraq.merge dequantizes it first."""
    model, _ = tiny
    loraq.apply(model, loraq.LoraConfig(r=4, method=method, use_dora=True))
    randomize(model, seed=4)
    trained = logits(model, tokens)
    layers = lora_layers(model)
    if method == "lora":
        kept = {n: x.base.weight.clone() for n, x in layers.items()}
        for layer in layers.values():
            layer.merge()
        assert close(logits(model, tokens), trained)
        for name, layer in layers.items():
            layer.unmerge()
            assert torch.equal(layer.base.weight, kept[name])
    else:
        with pytest.raises(LoraqError, match="cannot be merged exactly into a NF4"):
            next(iter(layers.values())).merge()
    assert close(logits(loraq.merge(model), tokens), trained)


def test_magnitude_only_dora(tiny, tokens, tmp_path, tiny_model_dir):
    """--dora --rank 0: only the magnitudes train; they merge into any INT-k base's scales and offsets and
    round-trip through loraq's adapter files."""
    model, _ = tiny
    loraq.apply(model, loraq.LoraConfig(r=0, method="qalora", use_dora=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.numel()]  # (A, B: rank 0, empty)
    assert trainable and all(n.endswith("magnitude") for n in trainable)
    randomize(model, seed=6)
    trained = logits(model, tokens)
    loraq.save_adapter(model, tmp_path / "mag")
    fresh, _ = loraq.load_model(tiny_model_dir)
    loraq.apply(fresh, loraq.LoraConfig(r=0, method="qalora", use_dora=True))
    loraq.load_adapter_weights(fresh, tmp_path / "mag")
    assert close(logits(fresh, tokens), trained, 1e-6)
    assert close(logits(loraq.merge(model), tokens), trained, 1e-3)


def test_options_dora_cannot_take_are_refused():
    with pytest.raises(LoraqError, match="use one of --dora and --train-constants"):
        loraq.LoraConfig(method="qalora", use_dora=True, train_constants="offset")
    with pytest.raises(LoraqError, match="use_dora .* must be true or false"):
        loraq.LoraConfig(use_dora="yes")


def test_train_with_dora_writes_a_peft_dora_adapter(tmp_path, tiny_model_dir, tokens):
    from conftest import E2E_TINY

    from loraq import TrainConfig

    config = TrainConfig(model=str(tiny_model_dir), data=str(E2E_TINY), steps=6, batch_size=4, lr=1e-2, rank=4,
                         method="qalora", dora=True, eval_every=3, out=str(tmp_path / "run"))  # fmt: skip
    result = loraq.train(config, progress=False)
    assert result.val_loss_after < result.val_loss_before
    import json

    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    base, _ = loraq.load_model(tiny_model_dir, method="qalora")  # the INT4 g32 base it trained on
    reloaded = loraq.load_adapter(base, tmp_path / "run" / "adapter")
    assert close(logits(reloaded.eval(), tokens), logits(result.model.eval(), tokens), 1e-4)


def test_peft_dora_from_transformers_gguf_model_loads_onto_the_files_codes(tmp_path):
    """A PEFT DoRA adapter trained on the model transformers makes of a GGUF (q/k rows un-permuted to its order)
    loads onto loraq's model of the same file's codes with the same logits: magnitudes and B rows follow the
    q/k permutation."""
    from conftest import build_tokenizer
    from test_gguf_blocks import tiny_model, write_tiny_gguf
    from transformers import AutoModelForCausalLM

    from loraq.quant.schemes.gguf import GgufCodes

    tokenizer = build_tokenizer()
    model = tiny_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_tiny_gguf(model, "llama", tmp_path / "tiny.gguf", ["Q4_1"])
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32, tie_word_embeddings=False
    )
    rest = {k: v for k, v in model.state_dict().items() if "_proj" not in k}  # (the file holds the linears only)
    theirs.load_state_dict(rest, strict=False)
    ours, _ = loraq.load_model(tmp_path, quantize_layer=GgufCodes(tmp_path / "tiny.gguf").quantize_layer)
    tokens = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    assert close(logits(ours, tokens), logits(theirs, tokens))  # the same base
    config = PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], use_dora=True)
    peft_model = get_peft_model(theirs, config)
    randomize(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "ad")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, IntLinear)
    ours = loraq.load_adapter(ours, tmp_path / "ad")
    assert not close(logits(ours, tokens), logits(model, tokens), 1e-2)  # the adapter does change the logits
    assert close(logits(ours.eval(), tokens), logits(peft_model.eval(), tokens))


def peft_grads(peft_model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A, B, magnitude) gradients of every PEFT DoRA layer, in module order."""
    layers = [m for m in peft_model.modules() if hasattr(m, "lora_magnitude_vector")]
    return [tuple(p["default"].weight.grad for p in (m.lora_A, m.lora_B, m.lora_magnitude_vector)) for m in layers]


def adapters_of(model) -> list:
    """Every loraq adapter of the model, in module order (PEFT's order for the same targets)."""
    return [a for layer in lora_layers(model).values() for a in layer.adapters.values()]


def test_dora_gradients_equal_peft_s(tiny_model_dir, tmp_path):
    """PEFT's DoRA and loraq's, the same adapter, one loss: the same gradients for A, B, the magnitudes (fp32)."""
    base, _ = loraq.load_model(tiny_model_dir)
    tokens = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    config = PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "ad")
    ours = loraq.load_adapter(base, tmp_path / "ad")
    for model in (ours, peft_model):
        model.train()
        model(tokens, labels=tokens).loss.backward()
    theirs, mine = peft_grads(peft_model), [(a.A.grad, a.B.grad, a.magnitude.grad) for a in adapters_of(ours)]
    assert len(mine) == len(theirs) == 6
    for got, want in zip(mine, theirs):
        for g, w in zip(got, want):
            assert close(g, w, 1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_dora_on_a_16_bit_base_is_the_plain_formula(conv1d):
    """DoRA's row scale in a transient copy of the weight (no dropout): the values and gradients of the plain
    formula y = k·(x·W0ᵀ + s·B·A·x) + b, k = m / ||W0 + s·B·A|| detached (PEFT's), fp32 and under bf16 autocast,
    for nn.Linear and GPT-2's Conv1D (fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    from loraq.core.lora import LoraLinear

    torch.manual_seed(0)
    base = Conv1D(12, 16) if conv1d else torch.nn.Linear(16, 12)
    base.requires_grad_(False)
    layer = LoraLinear(base)
    config = loraq.LoraConfig(r=4, alpha=8, use_dora=True, dropout=0.0)
    adapter = layer.add_adapter(config)
    layer.active = config.adapter_name
    with torch.no_grad():
        adapter.B.normal_()
        adapter.magnitude.mul_(torch.rand(12) + 0.5)
    w0 = (base.weight.T if conv1d else base.weight).detach()
    x = torch.randn(2, 5, 16, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = layer(x)
        delta = adapter.scaling * adapter.B @ adapter.A
        norm = torch.linalg.vector_norm(w0 + delta, dim=1).detach()
        want = adapter.magnitude / norm * (x @ w0.T + x @ delta.T) + base.bias
        tol = 3e-2 if autocast else 1e-5
        assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=tol, atol=tol)
        grad = torch.randn_like(want)
        params = (x, adapter.A, adapter.B, adapter.magnitude)
        for a, b in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
            assert torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max())


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_dora_gradients_on_a_quantized_base_equal_peft_s(tiny_model_dir, tokens, tmp_path, method):
    """The quantized path scales the weight and B instead of the outputs (QA-LoRA: k from group sums, folded into
    the group constants): PEFT's gradients (on the weight loraq's base computes with) for B, the magnitudes and
    (QLoRA) A, in fp32."""
    model, _ = loraq.load_model(tiny_model_dir)
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, method=method, use_dora=True))
    randomize(model)
    loraq.save_adapter(model, tmp_path / "ad")
    reference = dequantize_base(copy.deepcopy(loraq.unload(copy.deepcopy(model))))
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "ad", is_trainable=True)
    for m in (model, peft_model):
        m.train()
        m(tokens, labels=tokens).loss.backward()
    theirs, adapters = peft_grads(peft_model), adapters_of(model)
    assert len(adapters) == len(theirs) > 0
    for a, (grad_a, grad_b, grad_m) in zip(adapters, theirs):
        assert close(a.B.grad, grad_b) and close(a.magnitude.grad, grad_m)
        # QA-LoRA: the norm from the groups' code sums, the row factor in the constants (no weight of DoRA's own)
        assert (a.base_code_sums is not None) == (method == "qalora")
        if method == "qlora":
            assert close(a.A.grad, grad_a)


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_dora_with_dropout_on_a_quantized_base_is_peft_s_training_formula(tiny_model_dir, tokens, tmp_path, method):
    """With dropout a quantized base multiplies x and the dropped-out x in one product (one dequantization):
    PEFT's training-mode loss and gradients (the same random masks) on the weight loraq's base computes with."""
    model, _ = loraq.load_model(tiny_model_dir)
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, method=method, use_dora=True, dropout=0.2))
    randomize(model)
    loraq.save_adapter(model, tmp_path / "ad")
    reference = dequantize_base(copy.deepcopy(loraq.unload(copy.deepcopy(model))))
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "ad", is_trainable=True)
    losses = []
    for m in (model, peft_model):
        m.train()
        torch.manual_seed(5)
        loss = m(tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss)
    assert close(losses[0], losses[1])
    for a, (_, grad_b, grad_m) in zip(adapters_of(model), peft_grads(peft_model), strict=True):
        assert close(a.B.grad, grad_b) and close(a.magnitude.grad, grad_m)
