import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraq import LoraqError
from loraq.formats.checkpoint import is_quantized_folder, load_quantized, save_quantized
from loraq.quant.frozen import NF4Linear
from loraq.quant.schemes.nf4 import NF4


@pytest.fixture
def saved(tiny, tmp_path):
    model, tokenizer = tiny
    NF4().quantize_model(model)
    folder = save_quantized(model, tokenizer, tmp_path / "q")
    return model, folder


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_round_trip_is_exact_and_does_not_requantize(tiny, tokens, tmp_path, quant_type, double_quant):
    model, tokenizer = tiny
    NF4(quant_type, 64, double_quant).quantize_model(model)
    save_quantized(model, tokenizer, tmp_path / "q")
    assert is_quantized_folder(tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    before = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    after = {n: m for n, m in loaded.named_modules() if isinstance(m, NF4Linear)}
    assert before.keys() == after.keys() and len(after) == 14
    for name, m in before.items():
        assert torch.equal(m.packed, after[name].packed)
        assert torch.equal(m.absmax, after[name].absmax)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_folder_uses_the_bitsandbytes_key_layout(saved):
    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[key].dtype == torch.uint8 and tensors[key].shape == (64 * 64 // 2, 1)
    meta = json.loads(bytes(tensors[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["blocksize"] == 64 and meta["shape"] == [64, 64] and "nested_offset" in meta
    assert {f"{key}.absmax", f"{key}.quant_map", f"{key}.nested_absmax", f"{key}.nested_quant_map"} <= set(tensors)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert "lm_head.weight" not in tensors  # tied to the embedding, stored once


def test_transformers_with_bitsandbytes_loads_the_folder(saved, tokens):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model, folder = saved
    try:
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    except (ImportError, RuntimeError) as e:  # pragma: no cover - depends on the bitsandbytes backend
        pytest.skip(f"bitsandbytes cannot load 4-bit models here: {e}")
    torch.testing.assert_close(theirs(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-4)


def _corrupt(folder, key, value):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("model.layers.1.mlp.up_proj.weight.absmax", torch.zeros(3, dtype=torch.uint8), "has 3 elements"),
        ("model.layers.1.mlp.up_proj.weight", None, "is missing"),
        ("model.layers.0.self_attn.v_proj.weight.nested_absmax", torch.tensor([float("nan")]), "NaN"),
        ("model.layers.0.self_attn.v_proj.weight.absmax", torch.zeros(64), "is torch.float32, expected torch.uint8"),
        (
            "model.layers.0.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4",
            torch.tensor(list(b"{not json"), dtype=torch.uint8),
            "not a valid quantization state",
        ),
    ],
)
def test_a_corrupt_tensor_is_named(saved, key, value, expected):
    _, folder = saved
    _corrupt(folder, key, value)
    with pytest.raises(LoraqError, match=expected) as err:
        load_quantized(folder)
    assert key.removesuffix(".bitsandbytes__nf4") in str(err.value) or "quant_state" in str(err.value)


def test_a_truncated_file_is_named(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(LoraqError, match="model.safetensors: not a readable safetensors file"):
        load_quantized(folder)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 16), (2, 64), (8, 32)])
def test_int_k_round_trip_is_exact(tiny, tokens, tmp_path, bits, group_size):
    import loraq

    model, tokenizer = tiny
    loraq.quantize(model, loraq.LoraConfig(method="qalora", bits=bits, group_size=group_size))
    save_quantized(model, tokenizer, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "loraq", "format": "int", "bits": bits, "group_size": group_size}
    loaded, _ = loraq.load_model(tmp_path / "q")
    for name, module in model.named_modules():
        if hasattr(module, "codes"):
            again = loaded.get_submodule(name)
            assert torch.equal(module.packed, again.packed) and torch.equal(module.offset, again.offset)
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_a_corrupt_int_k_tensor_is_named(tiny, tmp_path):
    import loraq

    model, tokenizer = tiny
    loraq.quantize(model, loraq.LoraConfig(method="qalora"))
    folder = save_quantized(model, tokenizer, tmp_path / "q")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.scales"] = tensors["model.layers.1.mlp.up_proj.scales"][:3]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(
        LoraqError,
        match=r"model.safetensors: tensor model.layers.1.mlp.up_proj.scales has 6 elements, expected 256; the quan",
    ):
        load_quantized(folder)


def test_loading_leaves_other_threads_alone(saved, monkeypatch):
    """Building the model without memory must not change how *other* code builds modules meanwhile (it once
    patched nn.Module.register_parameter for the whole process)."""
    import threading

    from transformers import AutoModelForCausalLM

    _, folder = saved
    seen = {}
    original = AutoModelForCausalLM.from_config

    def from_config(*args, **kwargs):
        def build():
            seen["device"] = torch.nn.Linear(2, 2).weight.device.type

        thread = threading.Thread(target=build)
        thread.start()
        thread.join()
        seen["patched"] = torch.nn.Module.register_parameter is not register_parameter
        return original(*args, **kwargs)

    register_parameter = torch.nn.Module.register_parameter
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    load_quantized(folder)
    assert seen == {"device": "cpu", "patched": False}
