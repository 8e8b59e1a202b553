import copy
import hashlib

import numpy as np
import pytest
import torch

import loraq
from loraq import LoraqError
from loraq.formats.gguf import (
    GgufLayers,
    hf_linear_name,
    q4_1_decode,
    q4_1_encode,
    rows_from_gguf,
    rows_to_gguf,
    write_gguf,
)
from loraq.quant.frozen import IntLinear
from loraq.quant.intk import quantize_rtn
from loraq.quant.schemes.gguf import GgufCodes
from loraq.quant.schemes.intk import IntRTN


def test_q4_1_blocks_decode_like_the_gguf_package():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), generator=g, dtype=torch.uint8)
    d = (torch.rand(6, 2, generator=g) * 0.01).half()
    m = (torch.randn(6, 2, generator=g) * 0.01).half()
    blocks = q4_1_encode(codes, d, m)
    assert blocks.shape == (6, 40) and blocks.dtype == np.uint8
    theirs = dequantize(blocks, GGMLQuantizationType.Q4_1)
    ours = codes.float() * d.float().repeat_interleave(32, 1) + m.float().repeat_interleave(32, 1)
    assert np.array_equal(theirs, ours.numpy())
    back = q4_1_decode(blocks, 64)
    assert all(torch.equal(a, b) for a, b in zip(back, (codes, d, m)))


@pytest.mark.parametrize("heads", [9, 3])
def test_row_permutation_is_transformers_reverse_permute(heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(heads * 64, 96)
    expected = LlamaTensorProcessor()._reverse_permute_weights(w.numpy(), heads, heads)
    assert np.array_equal(rows_from_gguf(w, heads).numpy(), expected)
    assert torch.equal(rows_to_gguf(rows_from_gguf(w, heads), heads), w)


def test_names():
    assert hf_linear_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj"
    assert hf_linear_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj"
    assert hf_linear_name("token_embd.weight") is None


def _tiny_gguf(model, path):
    """A llama GGUF holding the tiny model's RTN INT4 g32 linear layers as Q4_1 (q/k rows permuted)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    config = model.config
    writer = GGUFWriter(path, arch="llama")
    writer.add_uint32("llama.attention.head_count", config.num_attention_heads)
    writer.add_uint32("llama.attention.head_count_kv", config.num_key_value_heads)
    writer.add_string("general.name", "tiny")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for module_name, module in list(layer.self_attn.named_children()) + list(layer.mlp.named_children()):
            if module_name not in names:
                continue
            codes, d, m = quantize_rtn(module.weight, 4, 32)
            heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(module_name)
            if heads:
                codes, d, m = (rows_to_gguf(x, heads) for x in (codes, d, m))
            blocks = q4_1_encode(codes, d, m)
            writer.add_tensor(f"blk.{i}.{names[module_name]}.weight", blocks, raw_dtype=GGMLQuantizationType.Q4_1)
    writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_codes_become_int_layers_and_write_back_byte_for_byte(tiny, tiny_model_dir, tmp_path):
    model, _ = tiny
    _tiny_gguf(model, tmp_path / "tiny.gguf")
    from_gguf, _ = loraq.load_model(tiny_model_dir, quantize_layer=GgufCodes(tmp_path / "tiny.gguf").quantize_layer)
    rtn, _ = loraq.load_model(tiny_model_dir)
    IntRTN(4, 32).quantize_model(rtn)
    for name, layer in from_gguf.named_modules():
        if isinstance(layer, IntLinear):
            other = rtn.get_submodule(name)
            assert torch.equal(layer.codes(), other.codes()) and torch.equal(layer.offset, other.offset), name
    write_gguf(from_gguf, tmp_path / "tiny.gguf", tmp_path / "copy.gguf")
    digest = [hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("tiny.gguf", "copy.gguf")]
    assert digest[0] == digest[1]


def test_gguf_errors_are_named(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(LoraqError, match="bad.gguf: not a readable GGUF file"):
        GgufLayers(tmp_path / "bad.gguf")
    _tiny_gguf(model, tmp_path / "tiny.gguf")
    with pytest.raises(LoraqError, match="layer model.layers.0.self_attn.q_proj is full precision"):
        write_gguf(model, tmp_path / "tiny.gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob(".out.gguf*"))


# --- the real default model (a Q4_1 GGUF) ---------------------------------------------------------------


@pytest.mark.slow
def test_default_gguf_codes_are_rtn_g32_of_the_loaded_weights():
    from loraq.product.fetch import SMOLLM2_GGUF, fetch

    fp32, _ = loraq.load_model("smollm2-135m")
    model, _ = loraq.load_model("smollm2-135m", quantize_layer=GgufCodes(fetch(SMOLLM2_GGUF)).quantize_layer)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IntLinear)}
    assert len(layers) == 210
    for name, layer in layers.items():
        weight = fp32.get_submodule(name).weight
        assert torch.equal(layer.dequantize(), weight), name  # the file's codes ARE the weights
        codes, scale, offset = quantize_rtn(weight, 4, 32)
        assert torch.equal(codes, layer.codes()) and torch.equal(offset, layer.offset), name


@pytest.mark.slow
def test_default_model_qalora_to_gguf(tmp_path):
    """A fine-tuned GGUF in, a fine-tuned GGUF of the same size out, computing what training computed."""
    from transformers import AutoModelForCausalLM

    from loraq.product.data import encode_all, load_examples, split_by_group
    from loraq.product.export import merge_run
    from loraq.product.fetch import SMOLLM2_GGUF, fetch

    cfg = loraq.TrainConfig(
        method="qalora", steps=4, batch_size=4, lr=2e-3, warmup_steps=0, eval_every=0, out=str(tmp_path / "run")
    )
    result = loraq.train(cfg, progress=False)
    report = merge_run(tmp_path / "run", tmp_path / "tuned.gguf", format="gguf", prompts=8)
    source = fetch(SMOLLM2_GGUF)
    assert abs(report.bytes_written - source.stat().st_size) < 4096
    tok = result.tokenizer
    items, _ = encode_all(tok, split_by_group(load_examples("e2e")).val, 256)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tuned.gguf", dtype=torch.float32).eval()
    merged = loraq.merge(copy.deepcopy(result.model)).eval()
    assert sum(isinstance(m, IntLinear) for m in merged.modules()) == 210  # still the 4-bit model
    agree = total = 0
    worst = 0.0
    with torch.no_grad():
        for item in items[:50]:
            ids = torch.tensor([item["input_ids"]])
            trained, in_memory, written = (m(ids).logits for m in (result.model, merged, theirs))
            worst = max(worst, float((written - in_memory).abs().max() / in_memory.abs().max()))
            agree += int((in_memory.argmax(-1) == trained.argmax(-1)).sum())
            total += ids.shape[1]
    assert worst <= 1e-3  # the file holds exactly the in-memory merged model
    assert agree / total >= 0.99  # and the merge (fp16 offsets) keeps what training computed


def test_dora_fine_tune_writes_the_same_q4_1_codes_with_its_scales_and_offsets(tiny, tiny_model_dir, tmp_path):
    """QA-DoRA on a Q4_1 file's own codes: merged into d' = k·d and m' = k·(m + Δ), written as Q4_1 with the
    codes byte-identical; the file read back holds exactly the merged layers, and computes what training did."""
    model, _ = tiny
    _tiny_gguf(model, tmp_path / "tiny.gguf")
    tuned, _ = loraq.load_model(tiny_model_dir, quantize_layer=GgufCodes(tmp_path / "tiny.gguf").quantize_layer)
    loraq.apply(tuned, loraq.LoraConfig(r=4, method="qalora", use_dora=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g)) if "magnitude" in name else p.normal_(
                    0, 0.05, generator=g
                )
    ids = torch.randint(3, 200, (2, 9), generator=g)
    with torch.no_grad():
        trained = tuned(ids).logits
    merged = loraq.merge(copy.deepcopy(tuned))
    write_gguf(merged, tmp_path / "tiny.gguf", tmp_path / "dora.gguf")
    back, _ = loraq.load_model(tiny_model_dir, quantize_layer=GgufCodes(tmp_path / "dora.gguf").quantize_layer)
    source, _ = loraq.load_model(tiny_model_dir, quantize_layer=GgufCodes(tmp_path / "tiny.gguf").quantize_layer)
    for name, layer in back.named_modules():
        if isinstance(layer, IntLinear):
            assert torch.equal(layer.packed, source.get_submodule(name).packed), name  # the same codes
            assert torch.equal(layer.dequantize(), merged.get_submodule(name).dequantize()), name
            assert not torch.equal(layer.scale, source.get_submodule(name).scale), name  # DoRA moved the scales
    with torch.no_grad():
        written = back(ids).logits
    assert float((written - trained).abs().max()) <= 1e-3 * float(trained.abs().max())
