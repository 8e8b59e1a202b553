"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel "gptq" v1, read by transformers, vLLM and others):
per linear layer `qweight` int32 (in·bits/32, out), `qzeros` int32 (groups, out·bits/32) holding zero − 1,
`scales` fp16 (groups, out), `g_idx` int32 (in,), and quantize_config.json (sym false, desc_act false).

GPTQ dequantizes w = scale·(q − z) with an integer zero point z, while IntLinear stores a float offset
(w = q·scale + offset). Writing rounds z = −offset/scale to an integer in [1, 2^k] (so that z − 1 fits in k
bits); after a QA-LoRA merge z is fractional, so this format loses the merge's exactness: `write_gptq`
returns how much, for the report. Bits 2, 4 and 8 are supported (3 bits packs across words; not written).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraqError
from ..quant.frozen import IntLinear

GPTQ_BITS = (2, 4, 8)


def _pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack k-bit values along dim 0: element i goes to word i·k/32, bit (i mod 32/k)·k."""
    per_word = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // per_word, per_word, *values.shape[1:])
    word = torch.zeros(v.shape[0], *values.shape[1:], dtype=torch.int64)
    for j in range(per_word):
        word |= v[:, j] << (bits * j)
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's complement view of the unsigned word


def _unpack_int32(words: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (bits * j)) & (2**bits - 1) for j in range(per_word)]
    return torch.stack(parts, dim=1).reshape(words.shape[0] * per_word, *words.shape[1:])


def gptq_tensors(layer: IntLinear) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The layer's GPTQ tensors and the weight they dequantize to (with the zero point rounded)."""
    if layer.bits not in GPTQ_BITS:
        raise LoraqError(f"GPTQ export supports {', '.join(map(str, GPTQ_BITS))} bits, not {layer.bits}")
    scale = layer.scale.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-layer.offset.float() / safe).clamp_(1, 2**layer.bits)
    codes = layer.codes()
    tensors = {
        "qweight": _pack_int32(codes.T.contiguous(), layer.bits),
        "qzeros": _pack_int32(zero - 1, layer.bits).T.contiguous(),
        "scales": layer.scale.T.contiguous(),
        "g_idx": torch.arange(layer.in_features, dtype=torch.int32) // layer.group_size,
    }
    group = layer.group_size
    weight = (codes.float() - zero.repeat_interleave(group, dim=1)) * layer.scale.float().repeat_interleave(
        group, dim=1
    )
    return tensors, weight


def write_gptq(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write a model whose linear layers (but the head) are IntLinear as a GPTQ folder into `folder`."""
    from safetensors.torch import save_file

    layers = {n: m for n, m in model.named_modules() if isinstance(m, IntLinear)}
    if not layers:
        raise LoraqError("GPTQ export needs INT-k layers (a qalora run, or --requantize int4)")
    kinds = {(m.bits, m.group_size) for m in layers.values()}
    if len(kinds) != 1:
        raise LoraqError(f"GPTQ export needs one bit width and group size for all layers, found {sorted(kinds)}")
    bits, group_size = kinds.pop()
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in layers:
            continue
        state[name] = tensor.half() if tensor.is_floating_point() else tensor
    for name, layer in layers.items():
        tensors, _ = gptq_tensors(layer)
        for key, t in tensors.items():
            state[f"{name}.{key}"] = t
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach().half()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    quantize_config = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        "quant_method": "gptq",
    }
    config = model.config.to_dict()
    config["quantization_config"] = quantize_config
    config["torch_dtype"] = "float16"
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def int_layer_from_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, bias=None) -> IntLinear:
    """Rebuild an IntLinear from a layer's GPTQ tensors (offset = −scale·z), e.g. to check an export."""
    codes = _unpack_int32(tensors["qweight"], bits).T.contiguous()
    zero = _unpack_int32(tensors["qzeros"].T.contiguous(), bits).T.float() + 1
    scale = tensors["scales"].T.float()
    if codes.shape[1] // group_size != scale.shape[1]:
        raise LoraqError(f"GPTQ tensors do not fit group size {group_size}")
    return IntLinear(codes.to(torch.uint8), scale.half(), (-scale * zero.T.contiguous()).half(), bits, bias)
