"""Model surgery: find the target linear layers, wrap them, freeze the rest, and undo it all by merging."""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraqError
from ..quant.frozen import IntLinear, NF4Linear, plain_linear, replace_module
from .config import LoraConfig
from .lora import LoraLinear

QUANTIZED = (NF4Linear, IntLinear)


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear layer that can take an adapter (all `nn.Linear` except the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = tuple(name + "." for name in lora_layers(model))
    names = []
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):
            continue  # the base layer inside a LoraLinear is not a target of its own
        if isinstance(module, (LoraLinear, *QUANTIZED)) or (isinstance(module, nn.Linear) and module is not head):
            names.append(name)
    return names


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
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise LoraqError(
            f"targets (--targets): {targets!r} matches no linear layer; this model's linear layers are "
            f"{', '.join(suffixes)} (e.g. {candidates[0] if candidates else 'none'})"
        )
    return chosen


def apply(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Attach a LoRA adapter to the model's target layers and freeze everything else.

    The model is changed in place and returned. Applying a second config with another `adapter_name`
    adds a second adapter beside the first; the active one stays active until `set_active_adapter`.

    Raises:
        LoraqError: no layer matches `config.targets`, or the adapter name is taken.
    """
    names = find_targets(model, config.targets)
    if config.pool > 1:
        _check_pooling(model, names, config.pool)
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


def _check_pooling(model: nn.Module, names: list[str], pool: int) -> None:
    """QA-LoRA pooling windows must be the base's quantization groups, or the merge would not be exact."""
    for name in names:
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLinear) else module
        if not isinstance(base, IntLinear):
            raise LoraqError(
                f"QA-LoRA (method qalora) needs an INT-k quantized base, but layer {name} is "
                f"{type(base).__name__}; quantize the model with quantize_model_int first"
            )
        if base.group_size != pool:
            raise LoraqError(
                f"QA-LoRA pooling window {pool} (--group-size) does not match layer {name}'s quantization "
                f"groups of {base.group_size}; the adapter could not merge exactly"
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
    the adapted model computed with no added latency. A QA-LoRA adapter leaves its INT-k layers INT-k
    (offsets changed, codes untouched); an NF4 base, or an INT-k base under a plain LoRA, is dequantized.
    """
    for name, layer in lora_layers(model).items():
        pooled = layer.active is not None and layer.adapters[layer.active].pool > 1
        if isinstance(layer.base, NF4Linear) or (isinstance(layer.base, IntLinear) and not pooled):
            replace_module(model, name, _merged_linear(layer))
        else:
            layer.merge()  # nn.Linear: into the weight; IntLinear + QA-LoRA: exactly into the group offsets
            replace_module(model, name, layer.base)
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
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    # a 4-bit layer holds its weight in buffers; count it as the parameters it stands for
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QUANTIZED))
    return ParameterSummary(trainable, total)


def _merged_linear(layer: LoraLinear) -> nn.Linear:
    """A full-precision nn.Linear holding the dequantized base weight plus the active adapter's update."""
    base = layer.base
    weight = base.dequantize(torch.float32)
    if layer.active is not None:
        weight += layer.adapters[layer.active].delta_weight().to(weight.device)
    return plain_linear(weight, base.bias, getattr(base, "weight_dtype", torch.float32))
