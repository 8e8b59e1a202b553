"""Save a quantized model as safetensors and load it back without re-quantizing; load a full-precision
folder while quantizing it layer by layer.

Each layer's tensors and config.json's `quantization_config` are its scheme's (quant/schemes/): an NF4 / FP4
folder has the exact layout transformers + bitsandbytes write for a `load_in_4bit` model (either side reads
the other's), an INT-k folder loraq's own. Every tensor is checked against the layer it belongs to before
anything is built, and a bad one is named with its file.

Models are built without memory first (`torch.device("meta")`, which affects only this thread) and their
tensors assigned as they are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_folder
from ..core.layers import keep_16bit_embeddings, layer_shape, quantizable_linear_names, replace_module
from ..errors import LoraqError
from ..quant.frozen import FrozenQuantized
from ..quant.schemes import CorruptTensor, Scheme, scheme_from_checkpoint, scheme_of
from .safetensors_file import SafetensorsFile


def checkpoint_scheme(folder: str | os.PathLike) -> Scheme | None:
    """The scheme of the quantized checkpoint in `folder` (None: not a quantized checkpoint loraq reads)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return scheme_from_checkpoint(qc) if isinstance(qc, dict) else None


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a quantized checkpoint loraq loads as is (bitsandbytes 4-bit, or loraq INT-k)."""
    return checkpoint_scheme(folder) is not None


def quantized_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], Scheme]:
    """The model's tensors in its scheme's serialization layout, and that scheme (one for all layers)."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, FrozenQuantized)}
    if not quantized:
        raise LoraqError("save_quantized: the model has no quantized layers; quantize it first")
    schemes = {name: scheme_of(m) for name, m in quantized.items()}
    kinds = {s.storage for s in schemes.values()}
    if len(kinds) != 1:
        raise LoraqError(f"save_quantized: one checkpoint holds one scheme, but the layers are {sorted(kinds)}")
    out = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in quantized}
    for name, m in quantized.items():
        for suffix, tensor in schemes[name].checkpoint_tensors(m).items():
            out[f"{name}.{suffix}"] = tensor
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}, next(iter(schemes.values()))


def save_quantized(model: nn.Module, tokenizer, folder: str | os.PathLike) -> Path:
    """Write a model whose linear layers are quantized (NF4/FP4 or INT-k) as a safetensors folder.

    The folder is written atomically; tied weights (the embedding and the head) are stored once.
    """
    with atomic_folder(folder) as tmp:
        write_quantized(model, tokenizer, tmp)
    return Path(folder)


def write_quantized(model: nn.Module, tokenizer, folder: Path) -> None:
    """`save_quantized` into an existing (temporary) folder, without the atomic rename."""
    from safetensors.torch import save_file

    state, scheme = quantized_state_dict(model)
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    config = model.config.to_dict()
    config["quantization_config"] = scheme.checkpoint_config()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_quantized(folder: str | os.PathLike, trust_remote_code: bool = False) -> nn.Module:
    """Build the model saved by `save_quantized` (or by transformers + bitsandbytes) without re-quantizing.

    Raises:
        LoraqError: the folder is not a quantized checkpoint, or a tensor is missing, of the wrong dtype or
            size, or unreadable; the message names the file and the tensor.
    """
    folder = Path(folder)
    scheme = checkpoint_scheme(folder)
    if scheme is None:
        raise LoraqError(f"{folder}: not a quantized checkpoint (no quantization_config loraq reads)")
    tensors, where = read_tensors(folder, lazy=False)
    model = skeleton(folder, trust_remote_code)
    for name in quantizable_linear_names(model):
        keys = [k[len(name) + 1 :] for k in tensors if k.startswith(name + ".") and k != f"{name}.bias"]
        if keys == ["weight"] and tensors[f"{name}.weight"].is_floating_point():
            continue  # stored unquantized: loaded below like any other tensor
        shape = layer_shape(model.get_submodule(name))
        take = taker(tensors, name, where)
        bias = tensors.pop(f"{name}.bias", None)
        try:
            layer = scheme.layer_from_checkpoint(take, keys, shape, bias)
        except CorruptTensor as e:
            raise LoraqError(
                f"{where}: tensor {name}.{e.suffix} {e.why}; the quantized checkpoint is corrupt"
            ) from None
        for key in keys:  # what the scheme did not need (bitsandbytes' quant maps)
            tensors.pop(f"{name}.{key}", None)
        replace_module(model, name, layer)
    return _load_rest(model, tensors, where)


def taker(tensors: dict[str, torch.Tensor], name: str, where: Path):
    def take(suffix: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        t = tensors.pop(f"{name}.{suffix}", None)
        if t is None:
            raise CorruptTensor(suffix, "is missing")
        if t.dtype != dtype:
            raise CorruptTensor(suffix, f"is {t.dtype}, expected {dtype}")
        if numel >= 0 and t.numel() != numel:
            raise CorruptTensor(suffix, f"has {t.numel()} elements, expected {numel}")
        return t.reshape(-1)

    return take


def load_quantizing(
    folder: str | os.PathLike,
    quantize_layer: Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module],
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a full-precision safetensors folder, quantizing each linear layer (but the head) as it is read.

    The full-precision model is never whole in memory: peak memory is the quantized model plus one layer
    in fp32. `quantize_layer(name, weight (out, in), bias)` returns the frozen quantized module.
    """
    folder = Path(folder)
    tensors, where = read_tensors(folder, lazy=True)
    model = skeleton(folder, trust_remote_code)
    for name in quantizable_linear_names(model):
        key = f"{name}.weight"
        if key not in tensors:
            raise LoraqError(f"{where}: tensor {key} is missing")
        module = model.get_submodule(name)
        weight = tensors.pop(key).float()
        if type(module).__name__ == "Conv1D":
            weight = weight.T
        bias = tensors.pop(f"{name}.bias", None)
        if tuple(weight.shape) != layer_shape(module):
            raise LoraqError(
                f"{where}: tensor {key} has shape {tuple(weight.shape)}, the model expects {layer_shape(module)}"
            )
        replace_module(model, name, quantize_layer(name, weight, None if bias is None else bias.float()))
        del weight
    return _load_rest(model, tensors, where)


class LazyTensors(dict):
    """key -> tensor, read from its safetensors file on each access (one layer at a time)."""

    def __init__(self, handles: dict[str, object]):
        super().__init__({k: None for k in handles})
        self.handles = handles

    def __getitem__(self, key: str) -> torch.Tensor:
        value = super().__getitem__(key)
        return self.handles[key].get_tensor(key) if value is None else value

    def rows(self, key: str, start: int, stop: int, dim: int = 0) -> torch.Tensor:
        """Entries start:stop of `key` along `dim` (0 or 1), read alone from the file."""
        return self.handles[key].rows(key, start, stop, dim)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.handles[key].shape(key)

    def is_float(self, key: str) -> bool:
        """Whether `key` is stored as floating point (read from the header alone; False if absent)."""
        return key in self and self.handles[key].is_float(key)

    def pop(self, key: str, default=None):
        if key not in self:
            return default
        value = self[key]
        super().pop(key)
        return value

    def items(self):
        return [(k, self[k]) for k in list(self.keys())]


def read_tensors(folder: Path, lazy: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of the folder's .safetensors files by name: mapped from the files (to be kept as stored), or
    (`lazy`) read into memory of its own when first asked for (to be converted: no file stays mapped)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoraqError(f"{folder}: no .safetensors file")
    handles: dict[str, SafetensorsFile] = {}
    for path in files:
        f = SafetensorsFile(path)
        for key in f.entries:
            handles[key] = f
    where = files[0] if len(files) == 1 else folder
    if lazy:
        return LazyTensors(handles), where
    return {k: f.mapped(k) for k, f in handles.items()}, where


def skeleton(folder: Path, trust_remote_code: bool) -> nn.Module:
    """The model of folder/config.json with every tensor on the meta device (no memory yet)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoraqError(f"{folder / 'config.json'}: cannot be read as a model config ({e})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # a thread-local function mode: other threads are unaffected
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.name_or_path = str(folder)
    return model


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> nn.Module:
    """Check and assign every tensor not consumed by a quantized layer; compute the buffers no file holds
    (rotary tables); tie weights; freeze."""
    quantized = {n for n, m in model.named_modules() if isinstance(m, FrozenQuantized)}
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in quantized}
    missing = sorted(k for k in expected - set(tensors) if not _tied_head(model, k))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise LoraqError(f"{where}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    embeddings = _embedding_keys(model)
    rest = {}
    for k in list(tensors):
        v = tensors.pop(k)  # read (16-bit loading) or a view of the mapped file (a quantized checkpoint)
        if tuple(v.shape) != tuple(shapes[k]):
            raise LoraqError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(shapes[k])}")
        sixteen = k in embeddings and v.dtype in (torch.float16, torch.bfloat16)
        rest[k] = v if sixteen or not v.is_floating_point() else v.float()
    model.load_state_dict(rest, strict=False, assign=True)
    compute_unsaved_buffers(model, where)
    model.tie_weights()
    if not keep_16bit_embeddings(model):  # the model cannot compute on them in 16 bits: fp32 copies
        for k in embeddings:
            p = model.get_parameter(k)
            p.data = p.data.float()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise LoraqError(f"{where}: no tensor for {left[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def compute_unsaved_buffers(model: nn.Module, where: Path) -> None:
    """Buffers computed at construction and never saved (rotary tables, Gemma's embedding scale) are still on
    the meta device: compute them on the CPU with the model's own initializer for that module, as transformers'
    from_pretrained does, keeping the module's loaded parameters."""
    for name, module in model.named_modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        if not hasattr(model, "_init_weights"):
            raise LoraqError(f"{where}: cannot build {type(model).__name__} without its weights (buffers of {name})")
        for n in metas:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        kept = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
        model._init_weights(module)
        with torch.no_grad():
            for n, p in module.named_parameters(recurse=False):
                p.copy_(kept[n])
        for n in metas:
            if module._buffers[n].is_floating_point() and not torch.isfinite(module._buffers[n]).all():
                raise LoraqError(f"{where}: {type(model).__name__} does not compute its buffer {name}.{n}")


def _embedding_keys(model: nn.Module) -> set[str]:
    """The names of the input embedding's and the output head's weights: loaded in the 16 bits a file stores
    them in (fp32 copies would hold nothing more and cost twice the memory, 1.6 GB for a 7B model)."""
    wanted = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return {n for n, p in model.named_parameters(remove_duplicate=False) if any(p is w for w in wanted)}


def _tied_head(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
