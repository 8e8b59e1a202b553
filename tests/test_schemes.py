"""The quantization-scheme registry: how a method resolves to a scheme, what each scheme answers, and that
every scheme quantizes on the device the weight is on."""

import pytest
import torch
from torch import nn

import loraq
from loraq import LoraConfig, LoraqError
from loraq.core.lora import LoraAdapter
from loraq.quant.frozen import IntLinear, NF4Linear
from loraq.quant.intk import pack_codes, quantize_rtn, unpack_codes
from loraq.quant.schemes import REGISTRY, scheme_for, scheme_named, scheme_of
from loraq.quant.schemes.full import FullPrecision
from loraq.quant.schemes.gguf import GgufCodes
from loraq.quant.schemes.gptq import IntGPTQ
from loraq.quant.schemes.intk import IntRTN
from loraq.quant.schemes.nf4 import NF4


@pytest.mark.parametrize(
    "config, kind, describe",
    [
        (LoraConfig(), FullPrecision, "full precision"),
        (LoraConfig(method="qlora"), NF4, "NF4+DQ blocksize 64"),
        (LoraConfig(method="qlora", quantizer="fp4"), NF4, "FP4+DQ blocksize 64"),
        (LoraConfig(method="qalora"), IntRTN, "INT4 g32"),
        (LoraConfig(method="qalora", bits=3, group_size=64), IntRTN, "INT3 g64"),
        (LoraConfig(method="qalora", quantizer="gptq", bits=2), IntGPTQ, "GPTQ INT2 g32"),
    ],
)
def test_a_method_resolves_to_one_scheme(config, kind, describe):
    scheme = scheme_for(config)
    assert type(scheme) is kind and scheme.describe() == describe


def test_a_gguf_source_gives_its_own_codes_only_for_int4_g32_rtn(tmp_path):
    source = tmp_path / "m.gguf"
    assert isinstance(scheme_for(LoraConfig(method="qalora"), source), GgufCodes)
    assert type(scheme_for(LoraConfig(method="qalora", bits=3), source)) is IntRTN
    assert type(scheme_for(LoraConfig(method="qalora", quantizer="gptq"), source)) is IntGPTQ
    assert type(scheme_for(LoraConfig(method="qlora"), source)) is NF4


def test_quantizers_are_checked_per_method():
    with pytest.raises(LoraqError, match="quantizer .* for method qlora must be auto or nf4 or fp4, got 'gptq'"):
        LoraConfig(method="qlora", quantizer="gptq")
    with pytest.raises(LoraqError, match="for method lora must be auto or none"):
        LoraConfig(quantizer="nf4")
    assert set(REGISTRY) == {"none", "nf4", "fp4", "rtn", "gptq"}


def test_bits_per_parameter_for_the_planner():
    assert NF4().bits_per_param(4096) == pytest.approx(4.127, abs=5e-4)
    assert NF4(double_quant=False).bits_per_param(4096) == 4.5
    assert IntRTN(4, 32).bits_per_param(4096) == 5.0  # 4 bits + fp16 scale and offset per 32
    assert IntRTN(2, 64).bits_per_param(4096) == 2.5
    assert FullPrecision().bits_per_param(4096) == 32


def test_scheme_of_a_layer_round_trips_and_answers_merges_and_exports():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    int4 = IntRTN(4, 32).quantize_layer("x", w, None)
    nf4 = NF4().quantize_layer("x", w, None)
    assert isinstance(int4, IntLinear) and isinstance(nf4, NF4Linear)
    assert scheme_of(int4).describe() == "INT4 g32" and scheme_of(nf4).describe() == "NF4+DQ blocksize 64"
    assert scheme_of(nn.Linear(4, 4)).describe() == "full precision" and scheme_of(nn.ReLU()) is None
    assert scheme_of(int4).merges_in_format(32) and not scheme_of(int4).merges_in_format(1)
    assert not scheme_of(nf4).merges_in_format(1) and FullPrecision().merges_in_format(32)
    assert "gguf" in scheme_of(int4).exact_exports and "gguf" not in IntRTN(3, 32).exact_exports
    assert scheme_of(nf4).exact_exports == ("checkpoint",)


def test_an_exact_merge_into_offsets_equals_the_pooled_forward():
    torch.manual_seed(0)
    layer = IntRTN(4, 32).quantize_layer("x", 0.05 * torch.randn(16, 64), None)  # weights of a real model's size
    adapter = LoraAdapter(64, 16, LoraConfig(r=2, method="qalora"))
    nn.init.normal_(adapter.B, std=0.05)
    x = torch.randn(3, 64)
    expected = layer(x) + adapter(x)
    IntRTN(4, 32).merge(layer, adapter)
    torch.testing.assert_close(layer(x), expected, rtol=1e-3, atol=1e-3)  # fp16 offsets
    with pytest.raises(LoraqError, match="cannot be merged exactly into a NF4"):
        NF4().merge(NF4().quantize_layer("x", torch.randn(16, 64), None), adapter)


def test_scheme_named_parses_requantize_options():
    assert scheme_named("int3").describe() == "INT3 g32"
    assert scheme_named("fp4").describe() == "FP4+DQ blocksize 64"
    with pytest.raises(LoraqError, match="unknown quantization scheme 'int9x'"):
        scheme_named("int9x")


def test_int_quantization_keeps_every_tensor_on_the_weights_device():
    """The meta device stands in for CUDA here: a tensor made on the CPU inside the quantizer would meet the
    meta weight and fail, as a CPU tensor meets a CUDA one ("Expected all tensors to be on the same device")."""
    w = torch.empty(16, 64, device="meta")
    codes, scale, offset = quantize_rtn(w, 4, 32)
    for bits in (2, 3, 4, 8):
        packed = pack_codes(codes, bits)
        assert packed.device.type == "meta"
        assert unpack_codes(packed, bits, codes.numel()).device.type == "meta"
    layer = IntRTN(4, 32).quantize_layer("x", w, None)
    assert all(b.device.type == "meta" for b in layer.buffers())
    assert all(b.device.type == "meta" for b in NF4().quantize_layer("x", w, None).buffers())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", [NF4(), NF4("fp4"), IntRTN(4, 32), IntRTN(3, 32), IntRTN(2, 64)])
def test_quantizing_on_cuda_equals_the_cpu_bit_for_bit(scheme):
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    cpu = scheme.quantize_layer("x", w, None)
    gpu = scheme.quantize_layer("x", w.cuda(), None)
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu()), name
    assert torch.equal(cpu.dequantize(), gpu.dequantize().cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_runs_on_cuda(tiny, tokens):
    model, _ = tiny
    model.cuda()
    batches = [{"input_ids": tokens.cuda(), "attention_mask": torch.ones_like(tokens).cuda()}]
    errors = loraq.quantize(model, LoraConfig(method="qalora", quantizer="gptq"), calibration=batches)
    assert errors and all(0 < e < 0.2 for e in errors.values())
    assert all(b.device.type == "cuda" for b in model.buffers())


def test_apply_uses_the_registry_for_every_method(tiny, tokens):
    model, _ = tiny
    loraq.apply(model, LoraConfig(r=2, method="qalora", bits=8, group_size=16))
    base = loraq.core.inject.lora_layers(model)["model.layers.0.mlp.up_proj"].base
    assert isinstance(base, IntLinear) and (base.bits, base.group_size) == (8, 16)


def test_the_worked_example_of_a_new_scheme_works_end_to_end(tiny, tokens, tmp_path, monkeypatch):
    """docs/architecture.md's example scheme (INT8 per row), registered the way the doc says: one class,
    one registry entry, one method quantizer. apply, training, checkpoints and merge then just work."""
    import re
    import sys
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(import torch\nfrom torch import nn\n\nfrom \.\.frozen.*?)```", doc, re.S)[1]
    code = code.replace("from ..frozen", "from loraq.quant.frozen").replace(
        "from .base", "from loraq.quant.schemes.base"
    )
    namespace: dict = {}
    exec(compile(code, "architecture.md", "exec"), namespace)
    scheme_class = namespace["Int8Rowwise"]
    schemes = sys.modules["loraq.quant.schemes"]
    config_module = sys.modules["loraq.core.config"]
    monkeypatch.setitem(schemes.REGISTRY, "int8row", lambda bits, group_size: scheme_class())
    monkeypatch.setattr(schemes, "LAYER_KINDS", (*schemes.LAYER_KINDS, scheme_class))
    monkeypatch.setitem(config_module.METHOD_QUANTIZERS, "lora", ("none", "int8row"))

    model, tokenizer = tiny
    with torch.no_grad():
        before = model(tokens).logits
    config = LoraConfig(r=2, quantizer="int8row")
    loraq.apply(model, config)
    base = loraq.core.inject.lora_layers(model)["model.layers.0.self_attn.q_proj"].base
    assert type(base).__name__ == "Int8RowLinear" and scheme_of(base).describe() == "INT8 per row"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=0.05, atol=0.05)
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    loraq.unload(model)
    loraq.save_quantized(model, tokenizer, tmp_path / "q")
    loaded, _ = loraq.load_model(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


# --- loading into shards: each process quantizes its own rows (product/sharded_load.py) ----------------------


def _split_quantize(scheme, name: str, weight: torch.Tensor, world: int) -> dict[str, torch.Tensor] | None:
    """Every process's part of each quantized tensor, as Scheme.quantize_rows makes them, joined in rank order.
    The gather (a collective in a real load) is played here by the block absmax of the whole weight."""
    from loraq.quant.nf4 import quantize_4bit
    from loraq.quant.schemes import RowShard

    out_features, in_features = weight.shape
    like = scheme.quantize_layer(name, torch.empty(weight.shape, device="meta"), None)
    blocks = quantize_4bit(weight, 64, "nf4", double_quant=False)[1].absmax
    every_absmax = blocks.view(out_features, -1) if in_features % 64 == 0 else None
    size = -(-out_features // world)
    parts = []
    for rank in range(world):
        start, stop = min(rank * size, out_features), min((rank + 1) * size, out_features)
        shard = RowShard(start, stop, out_features, rank, world, lambda rows: every_absmax)
        made = scheme.quantize_rows(name, weight[start:stop], shard, like)
        if made is None:
            return None
        parts.append(made[0])
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in like.quantized_tensors()}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "scheme", [IntRTN(2, 32), IntRTN(3, 32), IntRTN(4, 32), IntRTN(8, 64), NF4("nf4"), NF4("fp4", double_quant=False)]
)
def test_rows_quantized_apart_are_the_whole_layer_quantized_at_once(scheme, world):
    torch.manual_seed(0)
    weight = torch.randn(10, 128) * 0.02
    joined = _split_quantize(scheme, "x", weight, world)
    whole = scheme.quantize_layer("x", weight, None).quantized_tensors()
    assert joined is not None and set(joined) == set(whole)
    for key in whole:
        assert torch.equal(joined[key], whole[key]), key


def test_a_gguf_base_gives_each_process_its_rows_of_the_file(tiny, tmp_path):
    from test_gguf_blocks import write_tiny_gguf

    model, _ = tiny
    chosen = write_tiny_gguf(model, "llama", tmp_path / "t.gguf", ["Q4_1", "Q4_0", "Q8_0", "Q5_1"])
    scheme = GgufCodes(tmp_path / "t.gguf")
    for name in list(chosen)[:4]:  # q (rows permuted in the file), k, v, o: one of each type
        weight = model.get_submodule(name).weight.detach()
        joined = _split_quantize(scheme, name, weight, 2)
        whole = scheme.quantize_layer(name, weight, None).quantized_tensors()
        assert joined is not None and all(torch.equal(joined[k], whole[k]) for k in whole), name


@pytest.mark.parametrize("scheme, in_features", [(NF4("nf4"), 96), (IntRTN(3, 4), 36)])
def test_a_layout_without_rows_of_its_own_asks_for_the_whole_layer(scheme, in_features):
    assert _split_quantize(scheme, "x", torch.randn(6, in_features), 2) is None
