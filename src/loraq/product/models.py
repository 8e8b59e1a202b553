"""Loading models: the embedded default (converted once from its GGUF into a cached safetensors folder),
a local Hugging Face folder, a local GGUF file, or a hub id when online."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_folder
from ..core.config import LoraConfig
from ..core.layers import linear_weight, quantizable_linear_names, replace_module
from ..errors import LoraqError
from ..formats.checkpoint import is_quantized_folder, load_quantized, load_quantizing
from ..quant.schemes import Scheme, scheme_for
from .fetch import SMOLLM2_GGUF, cache_dir, fetch

QuantizeLayer = Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its public id, which adapters name as their base
_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default", DEFAULT_MODEL_ID.lower()}


def is_default_model(name: str | os.PathLike) -> bool:
    """Whether `name` names the embedded default model (its short names, or its public id: loraq has no network
    at run time, so the id resolves to the embedded copy, the weights of its Q4_1 GGUF)."""
    return str(name).lower() in _ALIASES


def default_model_dir() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, made on first use from the packaged GGUF."""
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf_path = fetch(SMOLLM2_GGUF)
    print(f"loraq: converting {gguf_path.name} to a safetensors folder in {folder} (once)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model, tokenizer = _load_gguf(gguf_path)
    # transformers refuses save_pretrained on a GGUF-loaded model: copy the weights into a fresh one.
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_ID
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    with atomic_folder(folder) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"loraq: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return folder


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for a bad GGUF; name the file once
        raise LoraqError(f"could not load GGUF file {path}: {type(e).__name__}: {e}") from None
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantize_layer: QuantizeLayer | None = None,
    method: str | LoraConfig | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal language model and its tokenizer.

    Args:
        name_or_path: "smollm2-135m" (the embedded default, fetched once from the package registry), a
            local Hugging Face folder, a 4-bit folder written by `save_quantized` (loaded as is, without
            re-quantizing), a local .gguf file, or a hub id (needs network).
        dtype: parameter dtype (float32 by default, as CPU training wants).
        trust_remote_code: allow a hub model's own Python code to run. Off unless you ask.
        method: "lora", "qlora" or "qalora", or a LoraConfig (its method, bits, group size and quantizer):
            load the base that method trains on, quantizing every linear layer but the head while loading
            (from a local safetensors folder, the default model's included, layer by layer, so the
            full-precision model is never whole in memory; from other sources after loading). QA-LoRA INT4
            g32 on a Q4_1 GGUF takes the file's own codes. GPTQ needs calibration data: use `loraq.quantize`.
        quantize_layer: instead of `method`, any function (name, weight (out, in), bias) -> frozen layer.

    Returns:
        (model, tokenizer), the model in eval mode; the tokenizer always has a pad token.

    Raises:
        LoraqError: the folder or file is missing or cannot be loaded.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if is_default_model(name):
        path = default_model_dir()
    if method is not None:
        quantize_layer = _method_layers(name, method)
    if quantize_layer is not None and path.is_dir() and any(path.glob("*.safetensors")):
        if is_quantized_folder(path):
            raise LoraqError(f"model {name!r} is already quantized; load it without quantizing again")
        model = load_quantizing(path, quantize_layer, trust_remote_code)
        return _finish(model, _load_tokenizer(path, trust_remote_code), name)
    model, tokenizer = _load_any(name, path, dtype, trust_remote_code)
    if quantize_layer is not None:
        _quantize_loaded(model, quantize_layer)
    return _finish(model, tokenizer, name)


def model_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The local folder a model name loads from (the default model's cached safetensors copy), else None."""
    if is_default_model(str(name_or_path)):
        return default_model_dir()
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def gguf_source(model_name: str) -> Path | None:
    """The GGUF file a model name loads from, if any (the default model ships as one)."""
    if is_default_model(model_name):
        return fetch(SMOLLM2_GGUF)
    path = Path(model_name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def method_scheme(model_name: str, config: LoraConfig) -> Scheme:
    """The scheme `config.method` trains on for this model (a GGUF source's own codes where they fit)."""
    return scheme_for(config, gguf_source(model_name))


def _method_layers(name: str, method: str | LoraConfig) -> QuantizeLayer | None:
    """The quantize-a-layer function of the base `method` trains on (None: plain LoRA keeps the model)."""
    config = method if isinstance(method, LoraConfig) else LoraConfig(method=method)
    scheme = method_scheme(name, config)
    if not scheme.quantized:
        return None
    if scheme.needs_calibration:
        scheme.quantize_layer(name, None, None)  # raises: calibration data is needed
    return scheme.quantize_layer


def _quantize_loaded(model: nn.Module, quantize_layer: QuantizeLayer) -> None:
    """Replace every linear layer but the head by `quantize_layer(name, weight, bias)`, one at a time."""
    names = quantizable_linear_names(model)
    if not names:
        raise LoraqError("quantize: the model has no linear layers besides the output head")
    for name in names:
        layer = model.get_submodule(name)
        bias = None if layer.bias is None else layer.bias.detach()
        replace_module(model, name, quantize_layer(name, linear_weight(layer).detach(), bias))
    for p in model.parameters():
        p.requires_grad_(False)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer of a model (any source `load_model` accepts), with a pad token, without the model."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if is_default_model(name):
        path = default_model_dir()
    try:
        if path.is_file() and path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        elif path.is_dir():
            tokenizer = _load_tokenizer(path, trust_remote_code)
        elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise LoraqError(f"model {name!r}: no such model folder or .gguf file")
        else:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except LoraqError:
        raise
    except Exception as e:
        raise LoraqError(f"could not load the tokenizer of {name!r}: {type(e).__name__}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoraqError(f"could not load the tokenizer in {path}: {type(e).__name__}: {e}") from None


def _load_any(name: str, path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path)
        return model.to(dtype), tokenizer
    if path.is_dir() and is_quantized_folder(path):
        return load_quantized(path, trust_remote_code=trust_remote_code), _load_tokenizer(path, trust_remote_code)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraqError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        source, kwargs = path, {"local_files_only": True}
    elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LoraqError(f"model {name!r}: no such model folder or .gguf file")
    else:
        source, kwargs = name, {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, safetensors errors...
        raise LoraqError(f"could not load model {name!r}: {type(e).__name__}: {e}") from None
    return model, tokenizer


def _finish(model: nn.Module, tokenizer, name: str):
    if is_default_model(name):  # not the cache folder: adapters name their base by its public id
        model.name_or_path = DEFAULT_MODEL_ID
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
