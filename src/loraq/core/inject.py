"""Model surgery: build the base the method names, find the target linear layers, wrap them, freeze the rest,
and undo it all by merging."""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraqError
from ..quant.frozen import FrozenQuantized, quantized_tensor_ids
from ..quant.schemes import Scheme, scheme_for, scheme_of
from .config import LoraConfig
from .layers import is_plain_linear, plain_linear, replace_module
from .lora import LoraLinear


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear layer that can take an adapter: nn.Linear, GPT-2's Conv1D and frozen quantized
    layers, except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = tuple(name + "." for name in lora_layers(model))
    names = []
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):
            continue  # the base layer inside a LoraLinear is not a target of its own
        if isinstance(module, (LoraLinear, FrozenQuantized)) or (is_plain_linear(module) and module is not head):
            names.append(name)
    return names


def _what_the_model_has(model: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    return ", ".join(kinds) or "no layers"


def find_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Resolve a `LoraConfig.targets` value to module names; raise naming what exists if nothing matches."""
    candidates = linear_module_names(model)
    if targets == "all-linear":
        chosen = candidates
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in candidates if pattern.fullmatch(n)]
    else:
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in candidates)]
        if unknown:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            hints = [difflib.get_close_matches(t, suffixes, n=1) for t in unknown]
            hint = "".join(f" (did you mean {h[0]!r} for {t!r}?)" for t, h in zip(unknown, hints) if h)
            raise LoraqError(
                f"targets (--targets): no linear layer named {', '.join(map(repr, unknown))}{hint}; "
                f"this model's linear layers are {', '.join(suffixes)}"
            )
        chosen = [n for n in candidates if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen and not candidates:
        raise LoraqError(
            f"targets (--targets): {targets!r} matches no linear layer: this model has no nn.Linear or Conv1D "
            f"layer besides its output head; its layers are {_what_the_model_has(model)}"
        )
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise LoraqError(
            f"targets (--targets): {targets!r} matches no linear layer; this model's linear layers are "
            f"{', '.join(suffixes)} (e.g. {candidates[0]})"
        )
    return chosen


def apply(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Attach a LoRA adapter to the model's target layers and freeze everything else.

    The method decides the base: on a full-precision model, `method="qlora"` first quantizes every linear
    layer but the output head to NF4 (or FP4), and `method="qalora"` to INT-k round-to-nearest, layer by
    layer, as training does; a base already in the method's format is kept. The model is changed in place and
    returned. Applying a second config with another `adapter_name` adds a second adapter beside the first;
    the active one stays active until `set_active_adapter`.

    Raises:
        LoraqError: no layer matches `config.targets`; the adapter name is taken; the base is quantized in a
            format the method cannot train on; GPTQ, which needs calibration data (use `quantize` first).
    """
    names = find_targets(model, config.targets)
    scheme = scheme_for(config)
    _build_base(model, names, config, scheme)
    active = next((layer.active for layer in lora_layers(model).values() if layer.active), config.adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            replace_module(model, name, module)
        module.add_adapter(config)
    for layer in lora_layers(model).values():
        for p in layer.adapters.parameters():
            p.requires_grad_(True)
    model.loraq_configs = {**getattr(model, "loraq_configs", {}), config.adapter_name: config}
    set_active_adapter(model, active)
    return model


def quantize(model: nn.Module, config: LoraConfig, calibration: Iterable[dict] | None = None) -> dict[str, float]:
    """Quantize every linear layer of a full-precision model but the output head into the base
    `config.method` trains on (NF4 for qlora, INT-k for qalora), one layer at a time, in place, on the
    device the model is on. `apply` does this itself, except for GPTQ, which needs `calibration`: batches
    (dicts of input_ids and attention_mask tensors) of text like the training data.

    Returns:
        ||W - Ŵ||/||W|| of each quantized layer, by name (empty for plain LoRA).
    """
    return scheme_for(config).quantize_model(model, calibration)


def _build_base(model: nn.Module, names: list[str], config: LoraConfig, scheme: Scheme) -> None:
    """Make the target layers' base the one the method names, or say why it cannot be."""
    bases = {}
    for name in names:
        module = model.get_submodule(name)
        bases[name] = scheme_of(module.base if isinstance(module, LoraLinear) else module)
    full = [n for n, s in bases.items() if s is not None and not s.quantized]
    if scheme.quantized and full:
        if any(isinstance(m, LoraLinear) for m in model.modules()):
            raise LoraqError(
                f"method {config.method}: layer {full[0]} already holds an adapter on a full-precision base; "
                "quantize the model before applying the first adapter"
            )
        scheme.quantize_model(model)  # every linear layer but the head, as training does
        bases = {n: scheme_of(model.get_submodule(n)) for n in names}
    for name, base in bases.items():
        if config.pool == 1 and scheme.quantized and base.storage != scheme.storage:
            raise LoraqError(
                f"method {config.method} trains on an {scheme.describe()} base, but layer {name} is {base.describe()}"
            )
        if config.train_constants != "none" and not base.trainable_constants:
            raise LoraqError(
                f"--train-constants {config.train_constants}: layer {name} is {base.describe()}, which has no group "
                "constants to train"
            )
        if config.pool > 1 and not base.merges_in_format(config.pool):
            raise LoraqError(
                f"QA-LoRA (method qalora) pools groups of {config.pool} input columns (--group-size), but layer "
                f"{name} is {base.describe()}: the adapter could not merge exactly; quantize the model as "
                f"INT{config.bits} g{config.pool} (loraq.quantize) or load it with method='qalora'"
            )


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA-wrapped layer of the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active adapter; layers that do not hold it run without an adapter (as in PEFT)."""
    configs = getattr(model, "loraq_configs", {})
    if name not in configs:
        raise LoraqError(f"no adapter named {name!r}; this model has {sorted(configs)}")
    layers = lora_layers(model).values()
    if any(layer.merged not in (None, name) for layer in layers):
        raise LoraqError(f"another adapter is merged into the base; unmerge it before switching to {name!r}")
    for layer in layers:
        layer.active = name if name in layer.adapters else None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside this block (for before/after comparisons)."""
    layers = list(lora_layers(model).values())
    if any(layer.merged is not None for layer in layers):
        raise LoraqError("cannot disable adapters while one is merged into the base; unmerge first")
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and remove every adapter (PEFT's merge_and_unload).

    Returns the same model object, now a plain transformers model with no LoRA layers, computing what
    the adapted model computed with no added latency. Where the base's scheme takes the adapter exactly (a
    full-precision base; a QA-LoRA adapter on its INT-k base: offsets changed, codes untouched) the base
    keeps its format; otherwise (NF4, or INT-k under a plain LoRA) the layer is dequantized to fp32 first.
    """
    for name, layer in lora_layers(model).items():
        if layer.active is None or layer.merges_in_format():
            layer.merge()
            replace_module(model, name, layer.base)
        else:
            replace_module(model, name, _merged_linear(layer))
    if hasattr(model, "loraq_configs"):
        del model.loraq_configs
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging, restoring the base model."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        replace_module(model, name, layer.base)
    if hasattr(model, "loraq_configs"):
        del model.loraq_configs
    return model


@dataclass
class ParameterSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Trainable vs total parameters (tied weights counted once, 4-bit weights by their element count)."""
    # a quantized layer's codes and constants count as the weight they stand for, not by their own sizes
    seen = quantized_tensor_ids(model)
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, FrozenQuantized))
    return ParameterSummary(trainable, total)


def dequantize_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every frozen quantized layer (outside adapters too) by a plain nn.Linear of its weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FrozenQuantized):
            replace_module(model, name, plain_linear(scheme_of(module).dequantize(module), module.bias, dtype))
    return model


def _merged_linear(layer: LoraLinear) -> nn.Linear:
    """A full-precision nn.Linear holding the dequantized base weight plus the active adapter's update."""
    base = layer.base
    weight = layer.adapters[layer.active].merged_weight(scheme_of(base).dequantize(base))
    return plain_linear(weight, base.bias, getattr(base, "weight_dtype", torch.float32))
