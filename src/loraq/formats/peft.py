"""Adapters on disk in Hugging Face PEFT's format, so that PEFT and vLLM load what loraq writes and back.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (metadata {"format": "pt"}), with keys
`base_model.model.<module name>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); a DoRA adapter also
`...lora_magnitude_vector` (out,) and `"use_dora": true`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_folder
from ..core.config import LoraConfig
from ..core.inject import apply, linear_module_names, lora_layers
from ..core.layers import is_conv1d, layer_shape
from ..errors import LoraqError
from ..quant.schemes import scheme_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# loraq's own, beside PEFT's files: a QA-LoRA adapter's trained group constants (gamma, delta per layer)
CONSTANTS_NAME = "group_constants.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# PEFT writes no adapter name in keys; older files and in-memory state dicts put one before ".weight".
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
# DoRA's magnitudes: PEFT writes `<module>.lora_magnitude_vector`, in memory `...lora_magnitude_vector.<name>.weight`
_MAGNITUDE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$"
)
# Config fields whose non-default values change the math; loraq refuses them rather than load them wrong.
_UNSUPPORTED = {
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "megatron_config": (None,),
}


def save_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter of `model` (the active one by default) as a PEFT adapter folder.

    The folder is written under a temporary name and renamed when complete.

    Raises:
        LoraqError: the model has no adapter (by that name).
    """
    configs: dict[str, LoraConfig] = getattr(model, "loraq_configs", {})
    layers = lora_layers(model)
    if not configs or not layers:
        raise LoraqError("the model has no LoRA adapter to save; call loraq.apply(model, config) first")
    name = adapter_name or next(iter(layers.values())).active
    if name not in configs:
        raise LoraqError(f"no adapter named {name!r}; this model has {sorted(configs)}")
    config = configs[name]
    tensors, constants = {}, {}
    for module_name, layer in layers.items():
        if name in layer.adapters:
            adapter = layer.adapters[name]
            # A QA-LoRA A is written expanded to a plain LoRA A (r, in), which PEFT and vLLM load; loraq
            # pools it back exactly (group sizes are powers of two, so A·pool_scale / pool_scale == A).
            tensors[f"{PREFIX}{module_name}.lora_A.weight"] = adapter.expanded_A().contiguous().cpu()
            tensors[f"{PREFIX}{module_name}.lora_B.weight"] = adapter.B.detach().float().contiguous().cpu()
            if adapter.dora:
                magnitude = adapter.magnitude.detach().float().contiguous().cpu()
                tensors[f"{PREFIX}{module_name}.lora_magnitude_vector"] = magnitude
            for which in ("gamma", "delta"):
                if getattr(adapter, which) is not None:
                    constants[f"{module_name}.{which}"] = getattr(adapter, which).detach().float().contiguous().cpu()
    metadata = {"format": "pt"}
    if config.pool > 1:
        metadata.update(loraq_qalora_group_size=str(config.pool), loraq_qalora_pooling=config.pooling)
    if constants:
        metadata["loraq_train_constants"] = config.train_constants
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        if config.r or config.use_dora:
            if not config.r:  # magnitudes alone (PEFT has no rank 0): the empty A and B go with them
                tensors = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        if constants:
            save_file(constants, str(tmp / CONSTANTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(_peft_config(model, config, layers, name), indent=2) + "\n")
    return folder


def _peft_config(model: nn.Module, config: LoraConfig, layers: dict, name: str) -> dict:
    targets = config.targets
    if targets == "all-linear":
        # PEFT stores the resolved suffixes; with every non-head linear layer targeted these match exactly.
        targets = sorted({m.rsplit(".", 1)[-1] for m, layer in layers.items() if name in layer.adapters})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(layer.base) for layer in layers.values()),  # GPT-2's Conv1D
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "modules_to_save": None,
        "inference_mode": True,
    }


def adapter_base_model(folder: str | os.PathLike) -> str | None:
    """The `base_model_name_or_path` an adapter folder names (None if it names none)."""
    raw = json.loads((Path(folder) / CONFIG_NAME).read_text(encoding="utf-8"))
    return raw.get("base_model_name_or_path") or None


def read_adapter_config(folder: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """Read and check a PEFT `adapter_config.json`; return the equivalent LoraConfig."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraqError(f"adapter folder {folder} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise LoraqError(f"{path} is missing: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraqError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise LoraqError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraqError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported; loraq loads LORA adapters")
    for key, allowed in _UNSUPPORTED.items():
        if key in raw and raw[key] not in allowed:
            raise LoraqError(f"{path}: {key}={raw[key]!r} is not supported by loraq (expected {allowed[0]!r})")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise LoraqError(f"{path}: required field {key!r} is missing")
    init = raw.get("init_lora_weights", True)
    meta = loraq_metadata(folder)
    qalora = {"method": "qalora", "group_size": meta["pool"]} if meta["train_constants"] != "none" else {}
    try:
        return LoraConfig(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout") or 0.0,
            targets=raw.get("target_modules") or "all-linear",
            init="gaussian" if init == "gaussian" else "kaiming",
            use_rslora=bool(raw.get("use_rslora", False)),
            adapter_name=adapter_name,
            pooling=meta["pooling"],
            train_constants=meta["train_constants"],
            use_dora=bool(raw.get("use_dora") or False),
            **qalora,
        )
    except LoraqError as e:
        raise LoraqError(f"{path}: {e}") from None


def read_adapter_tensors(folder: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load adapter weights with safetensors; a pickle file is refused unless explicitly allowed."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        legacy = folder / PICKLE_WEIGHTS_NAME
        if legacy.is_file() and not allow_pickle:
            raise LoraqError(
                f"{legacy} is a pickle file, which can run arbitrary code when loaded; loraq refuses it. "
                "Convert it to safetensors, or pass --allow-pickle if you trust its source"
            )
        if legacy.is_file():
            try:  # even when allowed, only tensors: torch's restricted unpickler refuses any other object
                return torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError, EOFError, RuntimeError...
                raise LoraqError(f"{legacy}: refused by the tensors-only unpickler ({type(e).__name__}: {e})") from None
        raise LoraqError(f"{path} is missing: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraqError(f"{path} is not a readable safetensors file: {e}") from None


def loraq_metadata(folder: str | os.PathLike) -> dict:
    """What loraq records in an adapter's safetensors metadata: the QA-LoRA pooling window (`pool`, 1 for a
    plain LoRA) and its `pooling` ("mean" for QA-LoRA adapters saved before sum pooling existed), and which
    group constants it trained (`train_constants`)."""
    from safetensors import safe_open

    folder = Path(folder)
    path = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder / CONSTANTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        pool = int(raw.get("loraq_qalora_group_size", "1"))
    except (SafetensorError, OSError, ValueError):
        raw, pool = {}, 1
    return {
        "pool": pool,
        "pooling": raw.get("loraq_qalora_pooling", "mean" if pool > 1 else "sum"),
        "train_constants": raw.get("loraq_train_constants", "none"),
    }


def _pooled_bases(model: nn.Module, pairs: dict, pool: int) -> bool:
    """Whether every adapted layer's base takes adapters pooling `pool` columns exactly (then the adapter is
    pooled again); a base quantized for another window is refused, a full-precision one takes it expanded."""
    windows = {}
    for name in pairs:
        module = model.get_submodule(name)
        windows[name] = scheme_of(getattr(module, "base", module)).pool_window
    for name, window in windows.items():
        if window is not None and window != pool:
            raise LoraqError(
                f"this QA-LoRA adapter pools groups of {pool} columns, but layer {name} is quantized in groups of "
                f"{window}; merge it into a base quantized with --group-size {pool}"
            )
    return all(window == pool for window in windows.values())


def load_adapter(
    model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default", allow_pickle: bool = False
) -> nn.Module:
    """Attach the PEFT adapter in `folder` to `model` (in place) and return the model.

    The layers that get an adapter are exactly those named in the weights file. Every shape is checked
    against the model before anything is changed. A QA-LoRA adapter written by loraq is pooled again when
    the model's layers are INT-k with its group size; on any other base it loads as the plain LoRA it
    expands to (which computes the same on the dequantized base).

    Raises:
        LoraqError: a missing or corrupt file, an unsupported PEFT option, a key that names no linear
            layer of this model, a shape that does not fit, or a non-finite weight.
    """
    config = read_adapter_config(folder, adapter_name)
    pairs, pool = _checked_pairs(model, folder, config, allow_pickle)
    if pool > 1:
        config.method, config.group_size = "qalora", pool
    else:
        config.pooling = "sum"  # loaded expanded: a plain LoRA
    file_targets = config.targets
    config.targets = sorted(pairs)
    apply(model, config)
    config.targets = file_targets
    _copy_into(model, pairs, adapter_name)
    return model


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load the weights of the PEFT adapter in `folder` into the model's existing adapter `adapter_name`
    (resuming a run, e.g. inside transformers' Trainer), checked as `load_adapter` checks them.

    Raises:
        LoraqError: the model has no such adapter, the folder holds another one (other layers, rank or
            pooling), or a file is missing or corrupt.
    """
    configs = getattr(model, "loraq_configs", {})
    if adapter_name not in configs:
        raise LoraqError(f"no adapter named {adapter_name!r} to load into; this model has {sorted(configs)}")
    config = read_adapter_config(folder, adapter_name)
    pairs, pool = _checked_pairs(model, folder, config, allow_pickle=False)
    holding = {name for name, layer in lora_layers(model).items() if adapter_name in layer.adapters}
    own = configs[adapter_name]
    mine = (own.r, own.pool, own.train_constants, own.use_dora)
    theirs = (config.r, pool, config.train_constants, config.use_dora)
    if set(pairs) != holding or mine != theirs:
        raise LoraqError(
            f"{Path(folder) / WEIGHTS_NAME}: this adapter (r={config.r}, {len(pairs)} layers, pooling {pool}) is not "
            f"the model's {adapter_name!r} (r={own.r}, {len(holding)} layers, pooling {own.pool})"
        )
    _copy_into(model, pairs, adapter_name)
    return model


def _checked_pairs(
    model: nn.Module, folder: str | os.PathLike, config: LoraConfig, allow_pickle: bool
) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], int]:
    """module name -> {"A": (key, tensor), "B": ...}, every name and shape checked against the model, and the
    pooling window they load with (A pooled back for a QA-LoRA adapter on bases that take it exactly)."""
    tensors = read_adapter_tensors(folder, allow_pickle) if config.r or config.use_dora else {}
    path = Path(folder) / WEIGHTS_NAME
    pool = loraq_metadata(folder)["pool"]
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key) or (_MAGNITUDE.match(key) if config.use_dora else None)
        if m is None:
            raise LoraqError(f"{path}: tensor {key!r} is not a LoRA A/B weight or DoRA magnitude")
        which = m.groupdict().get("which") or "magnitude"
        pairs.setdefault(m["module"], {})[which] = (key, tensor)
    constants = _read_constants(Path(folder), config)
    if config.r and constants and set(constants) != set(pairs):
        raise LoraqError(f"{Path(folder) / CONSTANTS_NAME}: its layers are not the adapter's")
    for module_name, kinds in constants.items():
        pairs.setdefault(module_name, {}).update(kinds)
    if not pairs:
        raise LoraqError(f"{path} holds no tensors")
    candidates = set(linear_module_names(model))
    for module_name, ab in pairs.items():
        if module_name not in candidates:
            close = difflib.get_close_matches(module_name, sorted(candidates), n=1)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise LoraqError(
                f"{path}: {next(iter(ab.values()))[0]!r} names module {module_name!r}, which is not a linear "
                f"layer of this model{hint}; was this adapter trained on another model?"
            )
        needed = ({"A", "B"} if config.r else set()) | ({"magnitude"} if config.use_dora else set())
        if not needed <= set(ab):
            missing = sorted(needed - set(ab))[0]
            raise LoraqError(f"{path}: module {module_name!r} has no lora_{missing} weight")
        out_features, in_features = layer_shape(model.get_submodule(module_name))
        expected = {"A": (config.r, in_features), "B": (out_features, config.r), "magnitude": (out_features,)}
        expected.update(gamma=(out_features, in_features // pool), delta=(out_features, in_features // pool))
        for which, (key, t) in ab.items():
            where = path if which in ("A", "B", "magnitude") else Path(folder) / CONSTANTS_NAME
            if tuple(t.shape) != expected[which]:
                raise LoraqError(
                    f"{where}: {key!r} has shape {tuple(t.shape)} but this model needs {expected[which]} "
                    f"(r={config.r}, layer {in_features}->{out_features})"
                )
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise LoraqError(f"{where}: {key!r} holds non-finite or non-float values")
    if pool > 1 and _pooled_bases(model, pairs, pool):
        for ab in pairs.values():
            if "A" not in ab:
                continue
            key_a, a = ab["A"]
            grouped = a.reshape(a.shape[0], -1, pool)
            if not torch.equal(grouped, grouped[..., :1].expand_as(grouped)):
                raise LoraqError(f"{path}: {key_a!r} is marked QA-LoRA but its columns are not constant per group")
            ab["A"] = (key_a, grouped[..., 0] * (pool if config.pooling == "mean" else 1))
        return pairs, pool
    if constants:
        raise LoraqError(
            f"{Path(folder) / CONSTANTS_NAME}: this adapter trained the group constants of an INT-k base quantized "
            f"in groups of {pool}; load it onto that base (method qalora, --group-size {pool})"
        )
    return pairs, 1


def _read_constants(folder: Path, config: LoraConfig) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """module name -> {"gamma": (key, tensor), "delta": ...} from the group-constants file ({} if none)."""
    path = folder / CONSTANTS_NAME
    if config.train_constants == "none":
        return {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraqError(f"{path} is missing or not a readable safetensors file: {e}") from None
    out: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        module_name, _, which = key.rpartition(".")
        if which not in ("gamma", "delta") or not module_name:
            raise LoraqError(f"{path}: tensor {key!r} is not a layer's gamma or delta")
        out.setdefault(module_name, {})[which] = (key, tensor)
    wanted = {"scale": {"gamma"}, "offset": {"delta"}, "both": {"gamma", "delta"}}[config.train_constants]
    for module_name, kinds in out.items():
        if set(kinds) != wanted:
            raise LoraqError(f"{path}: layer {module_name!r} has {sorted(kinds)}, expected {sorted(wanted)}")
    return out


def _copy_into(model: nn.Module, pairs: dict, adapter_name: str) -> None:
    layers = lora_layers(model)
    with torch.no_grad():
        for module_name, ab in pairs.items():
            adapter = layers[module_name].adapters[adapter_name]
            for which, (_, tensor) in ab.items():
                getattr(adapter, which).copy_(tensor)
