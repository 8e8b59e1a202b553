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
