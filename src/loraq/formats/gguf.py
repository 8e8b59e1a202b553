"""GGUF in and out: read the linear layers of a GGUF as the file's own blocks (any type of gguf_blocks.py; no
re-quantization; quant/schemes/gguf.py makes layers of them) and write a model's layers back into a copy of
the file, each in its own type.

Which tensors are linear layers, and their Hugging Face names, is one table per architecture (ARCHITECTURES):
llama (Mistral models included: llama.cpp writes them as llama), qwen2, qwen3, gemma2, gemma3 and phi3 (whose
fused qkv and gate_up tensors are Hugging Face's fused `qkv_proj` and `gate_up_proj` modules, so an adapter
covers the fused weight's rows as one layer).

llama.cpp stores a llama model's q_proj and k_proj with the rows of each head interleaved for its rotary
layout (GGUF row h·hd + 2i + j is Hugging Face row h·hd + (hd/2)·j + i); transformers undoes it on load, and so
do we, on whole rows of blocks (any block type survives a row move), and we redo it on export. Other
architectures keep Hugging Face's row order (transformers' GGUF loader permutes llama alone).

Q4_1 block (32 weights, 20 bytes): fp16 d, fp16 m, 16 bytes of codes; weight j (0..15) is the low nibble of
byte j, weight j + 16 its high nibble; w = q·d + m. That is IntLinear's layout at 4 bits, group 32, which is how
a Q4_1 layer trains (the Triton kernels included).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraqError
from ..quant.frozen import FrozenQuantized, GgufLinear, IntLinear
from .gguf_blocks import TYPES

_LLAMA_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_PHI3_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF architecture -> (its linear tensors' names -> Hugging Face module names, whether q/k rows are permuted)
ARCHITECTURES = {
    "llama": (_LLAMA_NAMES, True),  # Mistral GGUFs are llama files (llama.cpp converts them so)
    "qwen2": (_LLAMA_NAMES, False),
    "qwen3": (_LLAMA_NAMES, False),
    "gemma2": (_LLAMA_NAMES, False),
    "gemma3": (_LLAMA_NAMES, False),
    "phi3": (_PHI3_NAMES, False),
}
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
BLOCK = 32


def open_gguf(path: str | os.PathLike):
    """A gguf.GGUFReader for `path`; a missing, truncated or malformed file is named in a LoraqError (with the
    tensor, where one tensor's data lies past the end of the file or its type is unknown)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class Reader(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            for field in fields:  # check every tensor's extent before the reader maps any of them
                _, name, _, dims, raw_type, offset = field.parts
                name = bytes(name).decode("utf-8", "replace")
                try:
                    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                except (ValueError, KeyError):
                    raise ValueError(f"tensor {name} has an unknown type {int(raw_type[0])}") from None
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * size // block
                if end > len(self.data):
                    raise ValueError(
                        f"tensor {name}'s data ends at byte {end}, past the end of the file ({len(self.data)})"
                    )
            super()._build_tensors(start_offs, fields)

    path = Path(path)
    if not path.is_file():
        raise LoraqError(f"GGUF file {path} does not exist")
    try:
        return Reader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise LoraqError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def hf_linear_name(gguf_name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj` (None for other tensors)."""
    m = _LAYER.match(gguf_name)
    names = ARCHITECTURES[arch][0]
    return None if m is None or m[2] not in names else f"model.layers.{m[1]}.{names[m[2]]}"


def architecture(reader, path) -> str:
    """The file's architecture, if loraq has its table; else a LoraqError naming it."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise LoraqError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _heads_for(reader, gguf_name: str) -> int | None:
    """Number of heads whose rows llama.cpp interleaved in this tensor (None: not permuted)."""
    arch = _field(reader, "general.architecture")
    if not ARCHITECTURES.get(arch, ({}, False))[1]:
        return None
    if ".attn_q." in gguf_name:
        return int(_field(reader, f"{arch}.attention.head_count"))
    if ".attn_k." in gguf_name:
        kv = _field(reader, f"{arch}.attention.head_count_kv")
        return int(kv if kv is not None else _field(reader, f"{arch}.attention.head_count"))
    return None


def rows_from_gguf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """GGUF row order -> Hugging Face row order for a q/k tensor (any number of columns)."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def rows_to_gguf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face row order -> GGUF row order (inverse of `rows_from_gguf`)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def q4_1_decode(data, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns/32*20) uint8 Q4_1 blocks -> codes uint8 (rows, columns), d and m fp16 (rows, groups)."""
    rows = data.shape[0]
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(rows, columns // BLOCK, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    qs = blocks[..., 4:20]
    codes = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(rows, columns)
    return codes, d, m


def q4_1_rows(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks, uint8 (rows, columns/32*20), of INT4 g32 codes with their d and m."""
    return torch.from_numpy(q4_1_encode(codes, d, m))


def q4_1_encode(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Inverse of `q4_1_decode`: (rows, columns/32*20) uint8."""
    rows, columns = codes.shape
    q = codes.reshape(rows, columns // BLOCK, BLOCK).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    d_bytes = d.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1, 2)
    m_bytes = m.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1, 2)
    return torch.cat([d_bytes, m_bytes, qs], dim=-1).reshape(rows, -1).numpy()


class GgufLayers:
    """The linear layers of a GGUF by Hugging Face module name, read on request: `get(name)` gives the
    tensor's type name and its blocks, uint8 (rows, bytes per row), in Hugging Face row order; None for a layer
    the file lacks.

    Raises:
        LoraqError: the file is unreadable, of an architecture without a table, or holds a linear tensor of a
            type loraq cannot train on (the tensor, its type and the architecture named), or a tensor whose
            data does not fit its shape and type: all before any layer is read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.arch = architecture(self.reader, self.path)
        self.tensors = {}
        for t in self.reader.tensors:
            name = hf_linear_name(t.name, self.arch)
            if name is None:
                continue
            if t.tensor_type.name not in TYPES:
                raise LoraqError(
                    f"{self.path}: tensor {t.name} is {t.tensor_type.name}, a type loraq cannot train on "
                    f"(architecture {self.arch}; trainable: {', '.join(TYPES)})"
                )
            kind = TYPES[t.tensor_type.name]
            columns, rows = (int(x) for x in t.shape[:2])
            if t.data.ndim != 2 or t.data.shape != (rows, columns // kind.block * kind.nbytes) or columns % kind.block:
                raise LoraqError(
                    f"{self.path}: tensor {t.name} ({t.tensor_type.name}, shape {columns} x {rows}) holds data of "
                    f"shape {tuple(t.data.shape)}: the file is truncated or inconsistent"
                )
            self.tensors[name] = t

    def get(self, name: str) -> tuple[str, torch.Tensor] | None:
        t = self.tensors.get(name)
        if t is None:
            return None
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        heads = _heads_for(self.reader, t.name)
        return t.tensor_type.name, rows_from_gguf(blocks, heads) if heads else blocks


def write_gguf(model: torch.nn.Module, source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `source` again with every linear layer replaced by the model's: a GGUF-blocks layer in its own
    type (its blocks as a merge left them), an INT4 g32 layer as Q4_1.

    Everything else (metadata, tokenizer, embeddings, norms) is copied as is, so the result has the size of
    the source when its layers keep their types. The file is written under a temporary name and renamed when
    complete.

    Raises:
        LoraqError: a linear layer of the model is in no GGUF type, or the model does not match the file.
    """
    reader = open_gguf(source)
    arch = architecture(reader, source)
    out = Path(out)
    modules = dict(model.named_modules())
    blocks, types = {}, {}
    for t in reader.tensors:
        name = hf_linear_name(t.name, arch)
        if name is None:
            continue
        layer = modules.get(name)
        if not _gguf_storable(layer):
            raise LoraqError(
                f"GGUF export writes each layer in a GGUF block type (the file's own, or Q4_1 for INT4 g32), but "
                f"layer {name} is {_describe(layer)}; train on the GGUF's codes (--bits 4 --group-size 32) or export "
                "with --format gptq or hf"
            )
        heads = _heads_for(reader, t.name)
        if isinstance(layer, GgufLinear):
            data, types[t.name] = layer.blocks.cpu(), layer.type_name
        else:
            data, types[t.name] = q4_1_rows(layer.codes().cpu(), layer.scale.cpu(), layer.offset.cpu()), "Q4_1"
        blocks[t.name] = (rows_to_gguf(data, heads) if heads else data).numpy()
    layers = [m for m in modules.values() if isinstance(m, FrozenQuantized)]
    if len(blocks) != len(layers):
        raise LoraqError(f"{source} has {len(blocks)} linear layers, the model {len(layers)}: not its source file")
    return copy_gguf(reader, out, {name: (blocks[name], types[name]) for name in blocks})


def _gguf_storable(layer: torch.nn.Module | None) -> bool:
    """Whether a layer is in a GGUF block type as it is: a file's own blocks, or INT4 g32 (Q4_1's layout)."""
    if isinstance(layer, IntLinear):
        return (layer.bits, layer.group_size) == (4, 32)
    return isinstance(layer, GgufLinear)


def _describe(layer: torch.nn.Module | None) -> str:
    if layer is None:
        return "missing"
    if isinstance(layer, IntLinear):
        return f"INT{layer.bits} g{layer.group_size}"
    if isinstance(layer, FrozenQuantized):
        return f"{type(layer).__name__} ({layer.extra_repr()})"
    return "full precision"


def copy_gguf(reader, out: str | os.PathLike, replace: dict[str, tuple[np.ndarray, str]]) -> Path:
    """Write the GGUF `reader` holds again, every field and tensor as it is but the tensors in `replace`
    (name -> (data, type name: "Q4_K", "F32" ...)). Written under a temporary name and renamed when complete;
    with nothing replaced the copy is byte-identical."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = GGUFWriter(tmp, arch=_field(reader, "general.architecture"))
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue  # the writer adds these itself
            main = field.types[0]
            sub = field.types[-1] if main == GGUFValueType.ARRAY else None
            if main == GGUFValueType.STRING:
                value = bytes(field.parts[field.data[0]])
            elif sub == GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            writer.add_key_value(field.name, value, main, sub_type=sub)
        for t in reader.tensors:
            data, type_name = replace.get(t.name, (t.data, t.tensor_type.name))
            writer.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType[type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
