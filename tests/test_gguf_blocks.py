"""Every common GGUF block type and architecture: exact decoding against the gguf package (and transformers'
GGUF loader), merging into the file's own types, and writing the file back with the same types and size. The
files are tiny and written here: real quantizations where the gguf package has a quantizer, random valid
blocks (any bytes are valid codes) for the K-quants."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import loraq
from loraq import LoraConfig, LoraqError
from loraq.core.inject import lora_layers
from loraq.core.lora import LoraLinear
from loraq.formats import gguf_blocks
from loraq.formats.gguf import ARCHITECTURES, GgufLayers, rows_to_gguf, write_gguf
from loraq.product.export import _merge_in_format
from loraq.quant.frozen import GgufLinear, IntLinear
from loraq.quant.schemes import scheme_of
from loraq.quant.schemes.gguf import GgufCodes

TYPES = list(gguf_blocks.TYPES)
FP16_FIELDS = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fmt: skip


def random_blocks(type_name: str, rows: int, columns: int, seed: int = 0, scale: float = 0.002) -> np.ndarray:
    """Valid blocks of any codes, with small finite fp16 constants."""
    kind = gguf_blocks.TYPES[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * columns // kind.block, kind.nbytes), dtype=np.uint8)
    for pos in FP16_FIELDS[type_name]:
        raw[:, pos : pos + 2] = (
            np.abs(rng.standard_normal(len(raw)) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
        )
    return raw.reshape(rows, -1)


def blocks_for(weight: torch.Tensor, type_name: str, seed: int) -> np.ndarray:
    """The weight quantized by the gguf package where it has a quantizer for the type, else random blocks."""
    try:
        return gguf_quantize(weight.detach().float().numpy(), GGMLQuantizationType[type_name])
    except NotImplementedError:
        return random_blocks(type_name, *weight.shape, seed=seed)


@pytest.mark.parametrize("type_name", TYPES)
def test_every_type_decodes_bit_for_bit_like_the_gguf_package(type_name):
    blocks = random_blocks(type_name, 6, 512)
    theirs = gguf_dequantize(blocks, GGMLQuantizationType[type_name])
    ours = gguf_blocks.dequantize(torch.from_numpy(blocks.copy()), type_name)
    assert np.array_equal(theirs, ours.numpy())
    layer = GgufLinear(torch.from_numpy(blocks.copy()), type_name, 512)
    assert np.array_equal(layer.dequantize().numpy(), theirs)
    assert scheme_of(layer).describe() == f"GGUF {type_name}"


@pytest.mark.parametrize("type_name", [t for t in TYPES if gguf_blocks.TYPES[t].offsets == "none"])
def test_codes_write_back_byte_for_byte(type_name):
    blocks = torch.from_numpy(random_blocks(type_name, 4, 512, seed=3))
    q, _, _ = gguf_blocks.decode(blocks, type_name)
    assert torch.equal(gguf_blocks.encode_codes(blocks, type_name, q), blocks)


@pytest.mark.parametrize("type_name", [t for t in TYPES if gguf_blocks.TYPES[t].offsets != "none"])
def test_unchanged_offsets_write_back_byte_for_byte(type_name):
    blocks = torch.from_numpy(random_blocks(type_name, 4, 512, seed=4))
    _, _, b = gguf_blocks.decode(blocks, type_name)
    assert torch.equal(gguf_blocks.set_offsets(blocks, type_name, b), blocks)


def merged_error(type_name: str):
    """Merge a QA-LoRA adapter into a layer of this type; the merged weight against base + update, and the
    size of the grid the format stores offsets on (per weight)."""
    torch.manual_seed(0)
    layer = LoraLinear(GgufLinear(torch.from_numpy(random_blocks(type_name, 16, 512, seed=5)), type_name, 512))
    layer.add_adapter(LoraConfig(r=2, method="qalora"))
    layer.set_active("default")
    torch.nn.init.normal_(layer.adapters["default"].B, std=1e-4)
    expected = layer.base.dequantize() + layer.adapters["default"].delta_weight()
    q_before, a, _ = gguf_blocks.decode(layer.base.blocks, type_name)
    layer.merge()
    q_after, _, _ = gguf_blocks.decode(layer.base.blocks, type_name)
    return (layer.base.dequantize() - expected).abs(), a, q_before, q_after


def test_free_offsets_merge_exactly_to_fp16():
    for type_name in ("Q4_1", "Q5_1"):
        error, _, q_before, q_after = merged_error(type_name)
        assert torch.equal(q_before, q_after) and float(error.max()) < 1e-5


@pytest.mark.parametrize("type_name", ["Q2_K", "Q4_K", "Q5_K"])
def test_quantized_mins_merge_to_the_nearest_min_and_keep_the_codes(type_name):
    error, a, q_before, q_after = merged_error(type_name)
    assert torch.equal(q_before, q_after)
    assert float(error.max()) < 0.01  # within the super-block's fitted dmin grid


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K"])
def test_types_without_offsets_move_codes_by_the_nearest_whole_step(type_name):
    error, a, q_before, q_after = merged_error(type_name)
    step = a.abs().repeat_interleave(gguf_blocks.TYPES[type_name].sub, dim=1)
    low, high = gguf_blocks.code_range(type_name)
    # clamped codes can be further off; a sub-block whose scale is 0 holds zeros whatever its codes
    inside = (q_after > low) & (q_after < high) & (step > 0)
    assert bool((error[inside] <= step[inside] / 2 + 1e-6).all())


@pytest.mark.parametrize("type_name", [t for t in TYPES if gguf_blocks.TYPES[t].offsets != "free"])
def test_training_computes_with_what_the_type_can_hold(type_name):
    """Where a type cannot hold every update, the layer computes with the weights its merge writes, so the
    trained model is the written one, and passes the adapter its plain gradient (straight-through)."""
    torch.manual_seed(0)
    layer = LoraLinear(GgufLinear(torch.from_numpy(random_blocks(type_name, 16, 512, seed=5)), type_name, 512))
    adapter = layer.add_adapter(LoraConfig(r=2, method="qalora"))
    layer.set_active("default")
    torch.nn.init.normal_(adapter.B, std=2e-3)  # updates of a few code steps, rounded off by the type
    x = torch.randn(4, 512)
    y = layer(x)
    plain = layer.base(x) + adapter(x)
    assert float((y - plain).detach().abs().max()) > 1e-3  # the type's rounding of the update shows
    y.sum().backward()
    grads = adapter.A.grad.clone(), adapter.B.grad.clone()
    adapter.zero_grad()
    adapter(x).sum().backward()
    assert torch.allclose(grads[0], adapter.A.grad) and torch.allclose(grads[1], adapter.B.grad)

    with torch.no_grad():
        written = layer(x)
        assert layer(x) is not written and torch.equal(layer(x), written)  # cached weight, same result
        layer.merge()
        assert torch.allclose(layer(x), written, atol=1e-5)  # the merged layer computes what was trained
        layer.unmerge()
        adapter.B.mul_(0.5)  # an in-place change (an optimizer step) is seen
        assert not torch.allclose(layer(x), written, atol=1e-5)


def test_exact_types_compute_as_plain_qalora():
    layer = LoraLinear(GgufLinear(torch.from_numpy(random_blocks("Q5_1", 16, 512, seed=5)), "Q5_1", 512))
    adapter = layer.add_adapter(LoraConfig(r=2, method="qalora"))
    layer.set_active("default")
    torch.nn.init.normal_(adapter.B, std=2e-3)
    x = torch.randn(4, 512)
    assert torch.equal(layer(x), layer.base(x) + adapter(x))


# --- tiny files of every architecture ---------------------------------------------------------------------


def tiny_model(arch: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    make = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[arch]
    extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # some defaults lie past a tiny vocabulary
    torch.manual_seed(0)
    return make[1](make[0](**common, **extra)).eval()


def write_tiny_gguf(model, arch: str, path, types: list[str]) -> dict[str, str]:
    """The model's linear layers as a GGUF of `arch` (with the metadata transformers' loader needs), layer i in
    types[i % len(types)]; returns name -> type."""
    config = model.config
    names = {hf: gguf for gguf, hf in ARCHITECTURES[arch][0].items()}
    permute = ARCHITECTURES[arch][1]
    writer = GGUFWriter(path, arch=arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(config.vocab_size)
    writer.add_pad_token_id(0)
    chosen, i = {}, 0
    for name, module in model.named_modules():
        suffix = ".".join(name.split(".")[-2:])
        if not name.startswith("model.layers.") or suffix not in names:
            continue
        type_name = types[i % len(types)]
        i += 1
        weight = module.weight.detach()
        heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
        if permute and suffix in heads:
            weight = rows_to_gguf(weight, heads[suffix])
        data = blocks_for(weight, type_name, seed=i)
        writer.add_tensor(f"blk.{name.split('.')[2]}.{names[suffix]}.weight", data,
                          raw_dtype=GGMLQuantizationType[type_name])  # fmt: skip
        chosen[name] = type_name
    writer.add_tensor("output_norm.weight", np.ones(config.hidden_size, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return chosen


# (Hugging Face model, GGUF architecture): Mistral models are llama files
ARCHS = [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma2", "gemma2"),
         ("gemma3", "gemma3"), ("phi3", "phi3")]  # fmt: skip


@pytest.mark.parametrize("index, hf_kind, arch", [(i, *a) for i, a in enumerate(ARCHS)])
def test_every_architecture_trains_on_its_file_and_writes_it_back(index, hf_kind, arch, tmp_path):
    from conftest import build_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    model = tiny_model(hf_kind, len(tokenizer))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    source = tmp_path / "tiny.gguf"
    chosen = write_tiny_gguf(model, arch, source, TYPES[index:] + TYPES[:index])  # every type in some file
    loaded, _ = loraq.load_model(folder, quantize_layer=GgufCodes(source).quantize_layer)
    by_transformers = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name)
    file_layers = GgufLayers(source)
    for name, type_name in chosen.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, IntLinear if type_name == "Q4_1" else GgufLinear), name
        stored, blocks = file_layers.get(name)
        reference = gguf_dequantize(blocks.numpy(), GGMLQuantizationType[stored])
        assert np.array_equal(layer.dequantize().numpy(), reference), name
        assert torch.equal(layer.dequantize(), by_transformers.get_submodule(name).weight.float()), name

    loraq.apply(loaded, LoraConfig(r=2, method="qalora"))
    for layer in lora_layers(loaded).values():
        torch.nn.init.normal_(layer.adapters["default"].B, std=1e-4)
    tokens = torch.randint(3, len(tokenizer), (1, 8))
    with torch.no_grad():
        adapted = loaded(tokens).logits
    lost = _merge_in_format(loaded)  # what merge_run reports per layer
    assert set(lost) == set(chosen)
    for name, (kind, share) in lost.items():
        exact = chosen[name] in ("Q4_1", "Q5_1")
        assert (share < 0.05) if exact else (0 <= share <= 1.5), (name, kind, share)  # exact: fp16 offsets
    merged = loraq.merge(loaded)
    with torch.no_grad():
        error = float((merged(tokens).logits - adapted).abs().mean())
    assert error < 1e-3  # every type: the trained model computed with what its type holds (fp16 offsets aside)
    out = tmp_path / "out.gguf"
    write_gguf(merged, source, out)
    assert out.stat().st_size == source.stat().st_size
    back = GgufLayers(out)
    for name, type_name in chosen.items():
        stored, blocks = back.get(name)
        assert stored == type_name
        assert np.array_equal(gguf_dequantize(blocks.numpy(), GGMLQuantizationType[stored]),
                              merged.get_submodule(name).dequantize().numpy()), name  # fmt: skip


def test_unknown_architecture_and_type_are_named_before_any_work(tmp_path):
    writer = GGUFWriter(tmp_path / "a.gguf", arch="falcon")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(LoraqError, match="a.gguf: GGUF architecture 'falcon' is not supported"):
        GgufLayers(tmp_path / "a.gguf")
    writer = GGUFWriter(tmp_path / "b.gguf", arch="llama")
    writer.add_tensor("blk.0.attn_v.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(LoraqError, match=r"b.gguf: tensor blk.0.attn_v.weight is F32, a type loraq cannot train on "
                       r"\(architecture llama"):  # fmt: skip
        GgufLayers(tmp_path / "b.gguf")


def test_a_truncated_file_names_the_tensor_past_its_end(tmp_path):
    writer = GGUFWriter(tmp_path / "t.gguf", arch="llama")
    for name in ("blk.0.attn_v.weight", "blk.0.attn_q.weight"):
        writer.add_tensor(name, np.zeros((4, 40), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q4_1)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[:-50])
    with pytest.raises(LoraqError, match=r"t.gguf: not a readable GGUF file .*tensor blk.0.attn_q.weight's data ends"):
        GgufLayers(tmp_path / "t.gguf")


@pytest.mark.parametrize("type_name", TYPES)
def test_dora_magnitudes_alone_merge_into_every_types_block_scales(type_name):
    """--dora --rank 0 on any GGUF type: each row's factor k = m / ||W0|| goes into the blocks' fp16 d (and
    m / dmin); codes and sub-block scales untouched, the layer then computes what it trained to (fp16 rounding),
    and unmerge gives the very bytes back."""
    assert gguf_blocks.BLOCK_FACTORS[type_name] == tuple(FP16_FIELDS[type_name])
    blocks = torch.from_numpy(random_blocks(type_name, 16, 512, seed=7))
    layer = LoraLinear(GgufLinear(blocks.clone(), type_name, 512))
    layer.add_adapter(LoraConfig(r=0, use_dora=True))
    layer.set_active("default")
    with torch.no_grad():
        layer.adapters["default"].magnitude.mul_(1 + 0.1 * torch.randn(16, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = layer(x)
        q_before, _, _ = gguf_blocks.decode(layer.base.blocks, type_name)
        assert layer.merges_in_format()
        layer.merge()
        merged = layer(x)
    q_after, _, _ = gguf_blocks.decode(layer.base.blocks, type_name)
    assert torch.equal(q_before, q_after) and not torch.equal(layer.base.blocks, blocks)
    assert float((merged - trained).abs().max()) <= 1e-3 * float(trained.abs().max())
    theirs = gguf_dequantize(
        layer.base.blocks.numpy(), GGMLQuantizationType[type_name]
    )  # the file as llama.cpp reads it
    assert np.array_equal(theirs, layer.base.dequantize().numpy())
    layer.unmerge()
    assert torch.equal(layer.base.blocks, blocks)


def test_magnitudes_alone_train_on_a_file_of_every_type_and_write_its_codes_back(tmp_path):
    """`--dora --rank 0` end to end: trained by loraq.train on a file holding every type, merged and written: each
    tensor keeps its type and its codes, only block scales move, and the file computes what training did."""
    import copy

    from conftest import E2E_TINY, build_tokenizer

    tokenizer = build_tokenizer()
    model = tiny_model("llama", len(tokenizer))
    folder, source = tmp_path / "hf", tmp_path / "tiny.gguf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    chosen = write_tiny_gguf(model, "llama", source, TYPES)
    assert set(chosen.values()) == set(TYPES)
    loaded, _ = loraq.load_model(folder, quantize_layer=GgufCodes(source).quantize_layer)
    config = loraq.TrainConfig(model=str(folder), data=str(E2E_TINY), out=str(tmp_path / "run"), device="cpu",
                               method="qalora", rank=0, dora=True, steps=4, batch_size=2, lr=5e-3, warmup_steps=0,
                               eval_every=0, compute_dtype="fp32")  # fmt: skip
    trained = loraq.train(config, loaded, tokenizer, progress=False).model.eval()
    magnitudes = [a.magnitude for layer in lora_layers(trained).values() for a in layer.adapters.values()]
    assert len(magnitudes) == len(chosen)
    tokens = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = trained(tokens).logits
    merged = loraq.merge(copy.deepcopy(trained))
    write_gguf(merged, source, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").stat().st_size == source.stat().st_size
    before, after = GgufLayers(source), GgufLayers(tmp_path / "out.gguf")
    for name, type_name in chosen.items():
        (kind, old), (stored, new) = before.get(name), after.get(name)
        assert stored == kind == type_name, name
        assert torch.equal(gguf_blocks.decode(old, kind)[0], gguf_blocks.decode(new, kind)[0]), name  # same codes
        assert not torch.equal(old, new), name  # the row factors moved its block scales
    back, _ = loraq.load_model(folder, quantize_layer=GgufCodes(tmp_path / "out.gguf").quantize_layer)
    for name in chosen:  # the file holds exactly the merged model
        assert torch.equal(back.get_submodule(name).dequantize(), merged.get_submodule(name).dequantize()), name
    with torch.no_grad():
        written = back.eval()(tokens).logits
    # and that computes what training did, up to the fp16 rounding of k·d in every block (3e-4 to 9e-4 of a layer's
    # largest weight; through this random model's 14 layers: a mean of 3e-4 of the largest logit, the worst 2.4e-3)
    assert float((written - adapted).abs().mean()) <= 1e-3 * float(adapted.abs().max())
    untrained, _ = loraq.load_model(folder, quantize_layer=GgufCodes(source).quantize_layer)
    with torch.no_grad():  # (and training did move the model: the check above is not of an unchanged file)
        assert float((untrained.eval()(tokens).logits - adapted).abs().max()) > 1e-2 * float(adapted.abs().max())
