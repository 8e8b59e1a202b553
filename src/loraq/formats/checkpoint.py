"""Save a 4-bit model as safetensors and load it back without re-quantizing.

The key layout is the one transformers + bitsandbytes write for a `load_in_4bit` model, so either side can
read the other's folder: for each quantized layer `<name>.weight` holds the packed codes (uint8, (n/2, 1)),
beside `.weight.absmax`, `.weight.quant_map`, with double quantization `.weight.nested_absmax` and
`.weight.nested_quant_map`, and `.weight.quant_state.bitsandbytes__nf4` (a JSON dict stored as uint8 bytes:
blocksize, dtype, shape, nested_blocksize, nested_offset...). config.json carries a bitsandbytes
`quantization_config`. Every tensor is checked against the layer it belongs to before anything is built.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_folder
from ..errors import LoraqError
from ..quant.frozen import NF4Linear, quantizable_linear_names, replace_module
from ..quant.nf4 import BLOCKSIZES, NESTED_BLOCKSIZE, NF4State, code_4bit, dynamic_code_8bit

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a 4-bit checkpoint (a bitsandbytes 4-bit quantization_config)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in the bitsandbytes 4-bit serialization layout."""
    out: dict[str, torch.Tensor] = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner not in quantized:
            out[name] = tensor
    for name, m in quantized.items():
        key = f"{name}.weight"
        meta = {
            "quant_type": m.quant_type,
            "blocksize": m.blocksize,
            "dtype": str(m.weight_dtype).removeprefix("torch."),
            "shape": [m.out_features, m.in_features],
        }
        out[key] = m.packed
        out[f"{key}.absmax"] = m.absmax
        out[f"{key}.quant_map"] = code_4bit(m.quant_type)
        if m.offset is not None:
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(m.offset))
            out[f"{key}.nested_absmax"] = m.nested_absmax
            out[f"{key}.nested_quant_map"] = dynamic_code_8bit().clone()
        out[f"{key}.quant_state.bitsandbytes__{m.quant_type}"] = torch.tensor(
            list(json.dumps(meta).encode()), dtype=torch.uint8
        )
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_quantized(model: nn.Module, tokenizer, folder: str | os.PathLike) -> Path:
    """Write a model whose linear layers are NF4Linear (see `quantize_model`) as a safetensors folder.

    The folder is written atomically; tied weights (the embedding and the head) are stored once.
    """
    with atomic_folder(folder) as tmp:
        write_quantized(model, tokenizer, tmp)
    return Path(folder)


def write_quantized(model: nn.Module, tokenizer, folder: Path) -> None:
    """`save_quantized` into an existing (temporary) folder, without the atomic rename."""
    from safetensors.torch import save_file

    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise LoraqError("save_quantized: the model has no 4-bit layers; quantize it first")
    state = quantized_state_dict(model)
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    first = layers[0]
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type,
        "bnb_4bit_use_double_quant": first.offset is not None,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_quantized(folder: str | os.PathLike, trust_remote_code: bool = False) -> nn.Module:
    """Build the model saved by `save_quantized` (or by transformers + bitsandbytes) without re-quantizing.

    Raises:
        LoraqError: the folder is not a 4-bit checkpoint, or a tensor is missing, of the wrong dtype or size,
            or unreadable; the message names the file and the tensor.
    """
    folder = Path(folder)
    tensors, where = _read_tensors(folder, lazy=False)
    model = _skeleton(folder, trust_remote_code)
    for name in quantizable_linear_names(model):
        key = f"{name}.weight"
        if f"{key}.absmax" not in tensors:
            continue  # stored unquantized: loaded below like any other tensor
        module = model.get_submodule(name)
        packed, state = _layer_state(tensors, key, (module.out_features, module.in_features), where)
        bias = tensors.pop(f"{name}.bias", None)
        replace_module(model, name, NF4Linear(packed, state, bias))
    return _load_rest(model, tensors, where)


def load_quantizing(
    folder: str | os.PathLike,
    quantize_layer: Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module],
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a full-precision safetensors folder, quantizing each linear layer (but the head) as it is read.

    The full-precision model is never whole in memory: peak memory is the quantized model plus one layer
    in fp32. `quantize_layer(name, weight, bias)` returns the frozen quantized module.
    """
    folder = Path(folder)
    tensors, where = _read_tensors(folder, lazy=True)
    model = _skeleton(folder, trust_remote_code)
    for name in quantizable_linear_names(model):
        key = f"{name}.weight"
        if key not in tensors:
            raise LoraqError(f"{where}: tensor {key} is missing")
        weight = tensors.pop(key).float()
        bias = tensors.pop(f"{name}.bias", None)
        module = model.get_submodule(name)
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise LoraqError(
                f"{where}: tensor {key} has shape {tuple(weight.shape)}, the model expects "
                f"{(module.out_features, module.in_features)}"
            )
        replace_module(model, name, quantize_layer(name, weight, None if bias is None else bias.float()))
        del weight
    return _load_rest(model, tensors, where)


class _LazyTensors(dict):
    """key -> tensor, read from its safetensors file on first access (one layer at a time)."""

    def __init__(self, handles: dict[str, object]):
        super().__init__({k: None for k in handles})
        self.handles = handles

    def __getitem__(self, key: str) -> torch.Tensor:
        value = super().__getitem__(key)
        return self.handles[key].get_tensor(key) if value is None else value

    def pop(self, key: str, default=None):
        if key not in self:
            return default
        value = self[key]
        super().pop(key)
        return value

    def items(self):
        return [(k, self[k]) for k in list(self.keys())]


def _read_tensors(folder: Path, lazy: bool) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoraqError(f"{folder}: no .safetensors file")
    handles: dict[str, object] = {}
    for path in files:
        try:
            f = safe_open(str(path), framework="pt")
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                handles[key] = f
        except Exception as e:  # safetensors raises SafetensorError/OSError for truncated or lying headers
            raise LoraqError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    where = files[0] if len(files) == 1 else folder
    tensors = _LazyTensors(handles)
    if lazy:
        return tensors, where
    try:
        return {k: v for k, v in tensors.items()}, where
    except Exception as e:
        raise LoraqError(f"{where}: a tensor cannot be read ({type(e).__name__}: {e})") from None


def _skeleton(folder: Path, trust_remote_code: bool) -> nn.Module:
    """The model of folder/config.json with parameters on the meta device (no memory yet)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoraqError(f"{folder / 'config.json'}: cannot be read as a model config ({e})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.name_or_path = str(folder)
    return model


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> nn.Module:
    """Check and assign every tensor not consumed by a quantized layer; tie weights; freeze."""
    quantized = {n for n, m in model.named_modules() if not isinstance(m, nn.Linear) and hasattr(m, "dequantize")}
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in quantized}
    missing = sorted(k for k in expected - set(tensors) if not _tied_head(model, k))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise LoraqError(f"{where}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    rest = {}
    for k in list(tensors):
        v = tensors.pop(k)
        if tuple(v.shape) != tuple(shapes[k]):
            raise LoraqError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(shapes[k])}")
        # A copy, not a view of the file's memory map: a view would keep every page read while loading
        # (the whole full-precision file) resident for as long as the model lives.
        rest[k] = v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory) but real buffers (e.g. rotary tables,
    which are computed at construction and not saved)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _tied_head(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _layer_state(
    tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, int], where: Path
) -> tuple[torch.Tensor, NF4State]:
    def bad(tensor: str, why: str) -> LoraqError:
        return LoraqError(f"{where}: tensor {tensor} {why}; the quantized checkpoint is corrupt")

    meta_keys = [k for k in tensors if k.startswith(f"{key}.quant_state.bitsandbytes__")]
    if len(meta_keys) != 1:
        raise bad(f"{key}.quant_state.bitsandbytes__nf4", "is missing")
    raw = tensors.pop(meta_keys[0])
    try:
        meta = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        dtype = _DTYPES[meta.get("dtype", "float32")]
    except (ValueError, KeyError, TypeError) as e:
        raise bad(meta_keys[0], f"is not a valid quantization state ({e})") from None
    if quant_type not in ("nf4", "fp4") or blocksize not in BLOCKSIZES:
        raise bad(meta_keys[0], f"names quant_type {quant_type!r} / blocksize {blocksize}, which loraq cannot read")
    if meta.get("shape") is not None and tuple(meta["shape"]) != shape:
        raise bad(meta_keys[0], f"says shape {tuple(meta['shape'])}, but the layer is {shape}")
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    packed = _take(tensors, key, torch.uint8, (n + 1) // 2, bad).reshape(-1, 1)
    tensors.pop(f"{key}.quant_map", None)
    tensors.pop(f"{key}.nested_quant_map", None)
    if f"{key}.nested_absmax" in tensors:
        absmax = _take(tensors, f"{key}.absmax", torch.uint8, blocks, bad)
        nested = _take(tensors, f"{key}.nested_absmax", torch.float32, -(-blocks // NESTED_BLOCKSIZE), bad)
        try:
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        except (KeyError, TypeError, ValueError):
            raise bad(meta_keys[0], "lacks nested_offset") from None
        state = NF4State(shape, dtype, blocksize, quant_type, absmax, offset, nested)
    else:
        absmax = _take(tensors, f"{key}.absmax", torch.float32, blocks, bad)
        state = NF4State(shape, dtype, blocksize, quant_type, absmax)
    for name, t in ((f"{key}.nested_absmax", state.nested_absmax), (f"{key}.absmax", state.block_absmax())):
        if t is not None and not torch.isfinite(t).all():
            raise bad(name, "holds NaN or infinite scales")
    return packed, state


def _take(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int, bad) -> torch.Tensor:
    t = tensors.pop(key, None)
    if t is None:
        raise bad(key, "is missing")
    if t.dtype != dtype:
        raise bad(key, f"is {t.dtype}, expected {dtype}")
    if t.numel() != numel:
        raise bad(key, f"has {t.numel()} elements, expected {numel}")
    return t.reshape(-1)
