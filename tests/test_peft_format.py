import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import loraq
from loraq import LoraConfig, LoraqError
from loraq.core.inject import lora_layers


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def trained_adapter(model, seed=0, **kw):
    """Apply an adapter and give it non-zero B, as training would."""
    loraq.apply(model, LoraConfig(**{"r": 8, "alpha": 16, **kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.adapters["default"].B
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], r".*\.mlp\..*_proj"])
def test_loraq_adapter_loads_in_peft_with_same_logits(tiny_model_dir, tokens, tmp_path, targets):
    model, _ = loraq.load_model(tiny_model_dir)
    trained_adapter(model, targets=targets, use_rslora=True)
    expected = logits(model, tokens)
    loraq.save_adapter(model, tmp_path / "adapter")

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in saved)
    assert any(k.endswith(".lora_A.weight") for k in saved)

    base, _ = loraq.load_model(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert (logits(peft_model, tokens) - expected).abs().max() <= 1e-5


def test_peft_adapter_loads_in_loraq_with_same_logits(tiny_model_dir, tokens, tmp_path):
    base, _ = loraq.load_model(tiny_model_dir)
    torch.manual_seed(3)
    peft_model = get_peft_model(
        base, PeftLoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    expected = logits(peft_model, tokens)
    peft_model.save_pretrained(tmp_path / "peft")

    model, _ = loraq.load_model(tiny_model_dir)
    loraq.load_adapter(model, tmp_path / "peft")
    assert sorted(lora_layers(model)) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert (logits(model, tokens) - expected).abs().max() <= 1e-5
    merged = loraq.merge(model)
    assert (logits(merged, tokens) - expected).abs().max() <= 1e-5


def test_save_load_roundtrip_and_resave(tiny_model_dir, tokens, tmp_path):
    model, _ = loraq.load_model(tiny_model_dir)
    trained_adapter(model, targets=["k_proj", "up_proj"])
    expected = logits(model, tokens)
    loraq.save_adapter(model, tmp_path / "a")
    other, _ = loraq.load_model(tiny_model_dir)
    loraq.load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(logits(other, tokens), expected, rtol=0, atol=0)
    loraq.save_adapter(other, tmp_path / "b")
    config_a = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config_b = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config_a == config_b
    assert config_a["target_modules"] == ["k_proj", "up_proj"]
    assert config_a["peft_type"] == "LORA" and config_a["use_dora"] is False


def test_save_overwrites_atomically_and_failed_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    model, _ = loraq.load_model(tiny_model_dir)
    trained_adapter(model)
    loraq.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    import loraq.formats.peft as pf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        loraq.save_adapter(model, tmp_path / "a")
    with pytest.raises(OSError):
        loraq.save_adapter(model, tmp_path / "new")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_without_adapter_is_an_error(tiny, tmp_path):
    with pytest.raises(LoraqError, match="no LoRA adapter"):
        loraq.save_adapter(tiny[0], tmp_path / "x")


@pytest.fixture
def saved(tiny_model_dir, tmp_path):
    model, _ = loraq.load_model(tiny_model_dir)
    trained_adapter(model, targets=["q_proj"])
    loraq.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def rewrite(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file(fn(tensors), str(path), metadata={"format": "pt"})


def test_missing_folder_and_files_are_named(tiny, saved, tmp_path):
    with pytest.raises(LoraqError, match="does not exist"):
        loraq.load_adapter(tiny[0], tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraqError, match=r"adapter_model\.safetensors is missing"):
        loraq.load_adapter(tiny[0], saved)


def test_corrupt_files_are_named(tiny, saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoraqError, match="not a readable safetensors file"):
        loraq.load_adapter(tiny[0], saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraqError, match=r"adapter_config\.json is not valid JSON"):
        loraq.load_adapter(tiny[0], saved)


def test_pickle_adapter_is_refused(tiny, saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(LoraqError, match="pickle"):
        loraq.load_adapter(tiny[0], saved)


def test_wrong_shape_names_key_and_shapes(tiny, saved):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite(saved, lambda t: {**t, key: torch.zeros(8, 32)})
    with pytest.raises(LoraqError) as e:
        loraq.load_adapter(tiny[0], saved)
    assert key in str(e.value) and "(8, 32)" in str(e.value) and "(8, 64)" in str(e.value)
    assert not lora_layers(tiny[0])  # nothing was attached


def test_unknown_module_names_the_key(tiny, saved):
    def rename(t):
        return {k.replace("layers.0.", "layers.7."): v for k, v in t.items()}

    rewrite(saved, rename)
    with pytest.raises(LoraqError, match=r"layers\.7\.self_attn\.q_proj.*another model"):
        loraq.load_adapter(tiny[0], saved)


def test_nan_weights_and_unsupported_options_refused(tiny, saved):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    rewrite(saved, lambda t: {**t, key: torch.full_like(t[key], float("nan"))})
    with pytest.raises(LoraqError, match="non-finite"):
        loraq.load_adapter(tiny[0], saved)
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(LoraqError, match="bias='all' is not supported"):
        loraq.load_adapter(tiny[0], saved)
    (saved / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))  # without magnitudes
    with pytest.raises(LoraqError, match="has no lora_magnitude weight"):
        loraq.load_adapter(tiny[0], saved)
    (saved / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(LoraqError, match=r"adapter_config\.json.*r \(--rank\)"):
        loraq.load_adapter(tiny[0], saved)
