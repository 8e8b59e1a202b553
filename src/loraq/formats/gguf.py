"""GGUF in and out for INT-k bases: read a llama GGUF's Q4_1 blocks (the file's own codes, no
re-quantization; quant/schemes/gguf.py makes layers of them) and write a model's INT4 g32 layers back as Q4_1
blocks in a copy of the file.

Q4_1 block (32 weights, 20 bytes): fp16 d, fp16 m, 16 bytes of codes; weight j (0..15) is the low nibble of
byte j, weight j + 16 its high nibble; w = q·d + m. That is IntLinear's layout at 4 bits, group 32.

llama.cpp stores q_proj and k_proj with the rows of each head interleaved for its rotary layout
(GGUF row h·hd + 2i + j is Hugging Face row h·hd + (hd/2)·j + i); transformers undoes it on load, and so do
we, on codes, d and m alike (whole rows move, so the 32-column blocks survive), and we redo it on export.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraqError
from ..quant.frozen import FrozenQuantized

_LAYER = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SUPPORTED_ARCHITECTURES = ("llama",)
BLOCK = 32


def open_gguf(path: str | os.PathLike):
    """A gguf.GGUFReader for `path`; a missing, truncated or malformed file is named in a LoraqError."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LoraqError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise LoraqError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def hf_linear_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj` (None for other tensors)."""
    m = _LAYER.match(gguf_name)
    return None if m is None else f"model.layers.{m[1]}.{_HF[m[2]]}"


def _heads_for(reader, gguf_name: str) -> int | None:
    """Number of heads whose rows llama.cpp interleaved in this tensor (None: not permuted)."""
    arch = _field(reader, "general.architecture")
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


def q4_1_decode(data: np.ndarray, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns/32*20) uint8 Q4_1 blocks -> codes uint8 (rows, columns), d and m fp16 (rows, groups)."""
    rows = data.shape[0]
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(rows, columns // BLOCK, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    qs = blocks[..., 4:20]
    codes = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(rows, columns)
    return codes, d, m


def q4_1_encode(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Inverse of `q4_1_decode`: (rows, columns/32*20) uint8."""
    rows, columns = codes.shape
    q = codes.reshape(rows, columns // BLOCK, BLOCK).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    d_bytes = d.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1, 2)
    m_bytes = m.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1, 2)
    return torch.cat([d_bytes, m_bytes, qs], dim=-1).reshape(rows, -1).numpy()


class Q4_1Layers:
    """The linear layers of a llama GGUF by Hugging Face module name, decoded on request: `get(name)` gives
    (codes uint8 (out, in), d fp16 (out, in/32), m fp16) in Hugging Face row order for a Q4_1 tensor, the
    tensor type's name for another type, None for a layer the file lacks.

    Raises:
        LoraqError: the file is unreadable or not a supported (llama) architecture.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        arch = _field(self.reader, "general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LoraqError(
                f"{self.path}: GGUF architecture {arch!r} is not supported for INT bases (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self.tensors = {hf_linear_name(t.name): t for t in self.reader.tensors if hf_linear_name(t.name)}

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str | None:
        from gguf import GGMLQuantizationType

        t = self.tensors.get(name)
        if t is None:
            return None
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            return t.tensor_type.name
        codes, d, m = q4_1_decode(t.data, t.data.shape[1] // 20 * BLOCK)
        heads = _heads_for(self.reader, t.name)
        if heads:
            codes, d, m = (rows_from_gguf(x, heads) for x in (codes, d, m))
        return codes, d, m


def write_gguf(model: torch.nn.Module, source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `source` again with every linear layer replaced by the model's INT4 g32 layer as Q4_1 blocks.

    Everything else (metadata, tokenizer, embeddings, norms) is copied as is, so the result has the size
    of the source when the source's linear layers were Q4_1. The file is written under a temporary name
    and renamed when complete.

    Raises:
        LoraqError: a linear layer of the model is not stored as INT4 g32, or the model does not
            match the file.
    """
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    from ..quant.schemes import scheme_of

    reader = open_gguf(source)
    out = Path(out)
    modules = dict(model.named_modules())
    blocks = {}
    for t in reader.tensors:
        name = hf_linear_name(t.name)
        if name is None:
            continue
        layer = modules.get(name)
        scheme = scheme_of(layer) if layer is not None else None
        if scheme is None or "gguf" not in scheme.exact_exports:
            kind = "missing" if layer is None else scheme.describe() if scheme else type(layer).__name__
            raise LoraqError(
                f"GGUF export writes Q4_1 (INT4, group 32), but layer {name} is {kind}; "
                "train with --bits 4 --group-size 32 or export with --format gptq or hf"
            )
        codes, d, m = layer.codes(), layer.scale, layer.offset
        heads = _heads_for(reader, t.name)
        if heads:
            codes, d, m = (rows_to_gguf(x, heads) for x in (codes, d, m))
        blocks[t.name] = q4_1_encode(codes.cpu(), d.cpu(), m.cpu())
    layers = [m for m in modules.values() if isinstance(m, FrozenQuantized)]
    if len(blocks) != len(layers):
        raise LoraqError(f"{source} has {len(blocks)} linear layers, the model {len(layers)}: not its source file")
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
            data = blocks.get(t.name, t.data)
            raw_dtype = GGMLQuantizationType.Q4_1 if t.name in blocks else t.tensor_type
            writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
