import pytest

import loraq
from loraq import LoraqError


def test_load_local_folder(tiny_model_dir):
    model, tok = loraq.load_model(tiny_model_dir)
    assert model.config.num_hidden_layers == 2 and not model.training
    assert tok.pad_token is not None and tok.chat_template


def test_missing_and_bad_folders_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(LoraqError, match="no such model folder"):
        loraq.load_model(tmp_path / "missing")
    with pytest.raises(LoraqError, match="has no config.json"):
        loraq.load_model(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoraqError, match="could not load model"):
        loraq.load_model(broken)


@pytest.mark.slow
def test_default_model_end_to_end():
    """The real default model: fetched (or cached), 30 layers, answers, and a LoRA step moves only the adapter."""
    model, tok = loraq.load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    loraq.apply(model, loraq.LoraConfig(r=16, alpha=32))
    assert loraq.parameter_summary(model).trainable == 4_884_480
    text = loraq.generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in text


@pytest.mark.slow
def test_demo_writes_a_fine_tuned_gguf_of_the_same_size(tmp_path):
    from loraq.product.demo import GGUF_NAME, run_demo
    from loraq.product.fetch import SMOLLM2_GGUF, fetch

    result = run_demo(str(tmp_path / "demo"), steps=2)
    written = tmp_path / "demo" / GGUF_NAME
    assert abs(written.stat().st_size - fetch(SMOLLM2_GGUF).stat().st_size) < 4096
    samples = (tmp_path / "demo" / "samples.json").read_text()
    assert "after, from the written GGUF" in samples and result.val_loss_after < result.val_loss_before


def test_adapters_for_the_default_model_name_its_public_id(tiny_model_dir, tmp_path, monkeypatch):
    import json
    import sys

    models = sys.modules["loraq.product.models"]
    monkeypatch.setattr(models, "default_model_dir", lambda: tiny_model_dir)  # the cached copy's folder
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        model, _ = loraq.load_model(name)
        assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    loraq.apply(model, loraq.LoraConfig(r=2))
    loraq.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert str(tiny_model_dir) not in json.dumps(config)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def bf16_pair(request, tmp_path_factory):
    """The same tiny Llama saved twice: as bf16 safetensors, and as the exact fp32 upcast of those values."""
    import torch
    from conftest import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer), tie_word_embeddings=request.param).to(torch.bfloat16)
    folders = {}
    for dtype in (torch.bfloat16, torch.float32):
        folders[dtype] = tmp_path_factory.mktemp(f"bf16-{request.param}-{dtype}".replace("torch.", ""))
        model.to(dtype).save_pretrained(folders[dtype])
        tokenizer.save_pretrained(folders[dtype])
    return folders[torch.bfloat16], folders[torch.float32]


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_16bit_embeddings_stay_16bit_and_compute_as_fp32(bf16_pair, method, monkeypatch):
    """A 16-bit file's embedding and head are kept in 16 bits (half an fp32 copy's memory, no information lost)
    while the model computes in fp32: logits and the chunked loss's gradients equal those of the fp32 copy,
    the head cast a few vocabulary rows at a time."""
    import sys

    import torch

    from loraq.core.layers import Stored16Linear
    from loraq.product.train import loss_sum

    monkeypatch.setattr(sys.modules["loraq.core.layers"], "VOCAB_CHUNK", 100)  # several slices of 5xx rows
    sixteen, _ = loraq.load_model(bf16_pair[0], method=method)
    fp32, _ = loraq.load_model(bf16_pair[1], method=method)
    assert sixteen.get_input_embeddings().weight.dtype == torch.bfloat16
    assert type(sixteen.get_output_embeddings()) is Stored16Linear
    assert sixteen.get_output_embeddings().weight.dtype == torch.bfloat16
    assert fp32.get_input_embeddings().weight.dtype == torch.float32
    tied = sixteen.config.tie_word_embeddings
    assert (sixteen.get_output_embeddings().weight is sixteen.get_input_embeddings().weight) == tied
    vocab = sixteen.config.vocab_size
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = sixteen(ids).logits, fp32(ids).logits
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 1e-5 * want.abs().max()
    grads = []
    for model, chunked in ((sixteen, True), (sixteen, False), (fp32, True)):
        if not hasattr(model, "loraq_configs"):
            loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, method=method))
        model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:  # B too, so that every adapter tensor has a gradient
                p.data.normal_(0, 0.05, generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        total, _ = loss_sum(model, batch, chunked=chunked)  # unchunked: the head's own backward (rows_linear)
        total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    for got in grads[:2]:
        assert (got - grads[2]).abs().max() <= 1e-5 * grads[2].abs().max()
