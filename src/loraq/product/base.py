"""The frozen base a run trains on, built from the model name and the method's scheme (quant/schemes/):
LoRA keeps the model as loaded, QLoRA stores it as NF4, QA-LoRA as group-wise INT-k (a Q4_1 GGUF's own codes
where the model comes from one and INT4 g32 round-to-nearest is asked for; GPTQ calibrated on training
examples). Training and every later use of a run (merge, export, eval) build the base here, from what the run
folder recorded, so they all see exactly the base the adapter was trained on.
"""

from __future__ import annotations

import statistics
import sys

import torch
from torch import nn

from ..core.config import LoraConfig
from ..core.inject import linear_module_names
from ..errors import LoraqError
from ..formats.checkpoint import is_quantized_folder
from ..quant.intk import relative_error
from ..quant.schemes import Scheme, scheme_of
from .base_cache import cache_folder, load_cached, store
from .data import ordered_batches
from .models import load_model, load_tokenizer, method_scheme, model_folder
from .run_folder import RunFolder

CALIBRATION_EXAMPLES = 256


def build_base(
    model_name: str,
    config: LoraConfig,
    calibration: list[dict] | None = None,
    pad_id: int = 0,
    model: nn.Module | None = None,
    tokenizer=None,
    device: torch.device | str = "cpu",
    base_cache: str = "off",
) -> tuple[nn.Module, object, dict[str, float]]:
    """Load (or take) the model and make its base the one `config.method` names.

    Args:
        calibration: encoded examples for GPTQ (the first 256 are used).
        model, tokenizer: an already loaded model to quantize in place instead of loading one.
        device: where to quantize (each layer is moved there before it is quantized; the layers not
            quantized stay where they were loaded, for the caller to move).
        base_cache: "on", "off" or "auto" (sources of 1 GiB or more): keep the quantized base of a local
            safetensors folder on disk and map it from there, this time and every later time (base_cache.py).

    Returns:
        (model, tokenizer, relative reconstruction error ||W - Ŵ||/||W|| of each layer quantized here;
        empty for LoRA or a model already in the method's format).
    """
    scheme = method_scheme(model_name, config)
    errors: dict[str, float] = {}
    if model is None and is_quantized_folder(model_name):  # a quantized checkpoint: apply checks its format
        model, tokenizer = load_model(model_name)
    if model is not None and _already_built(model, scheme):
        return model, tokenizer, errors
    if scheme.needs_calibration:
        if not calibration:
            raise LoraqError(f"--quantizer {config.resolved_quantizer} needs training data to calibrate on")
        if model is None:
            model, tokenizer = load_model(model_name)
        model.to(device)
        n = min(len(calibration), CALIBRATION_EXAMPLES)
        print(f"loraq: {scheme.describe()} calibration on {n} training examples", file=sys.stderr)
        errors = scheme.quantize_model(model, ordered_batches(calibration[:n], 16, pad_id))
    elif model is not None:
        errors = scheme.quantize_model(model.to(device))
    else:

        def measured(name: str, weight, bias):
            weight = weight.to(device)
            layer = scheme.quantize_layer(name, weight, None if bias is None else bias.to(device))
            errors[name] = relative_error(weight, layer.dequantize())
            return layer

        cached = cache_folder(model_folder(model_name), scheme, base_cache, torch.device(device).type)
        found = load_cached(cached) if cached is not None else None
        if found is not None:
            (model, errors), tokenizer = found, load_tokenizer(model_name)
        else:
            model, tokenizer = load_model(model_name, quantize_layer=measured if scheme.quantized else None)
            if cached is not None and store(model, errors, cached):
                # the copy in memory gives way to the mapped file (page cache: the two are not held twice)
                model, errors = load_cached(cached) or (model, errors)
    if errors:
        print(
            f"loraq: base quantized as {scheme.describe()}; relative weight error of the {len(errors)} layers: mean "
            f"{statistics.mean(errors.values()):.4f}, max {max(errors.values()):.4f} ({max(errors, key=errors.get)})",
            file=sys.stderr,
        )
    return model, tokenizer, errors


def _already_built(model: nn.Module, scheme: Scheme) -> bool:
    """Whether there is nothing to build: plain LoRA trains on whatever base it is given, and a model already
    quantized is kept as it is (`apply` then checks that its format is the method's)."""
    if not scheme.quantized:
        return True
    for name in linear_module_names(model):
        module = model.get_submodule(name)
        found = scheme_of(getattr(module, "base", module))
        if found is not None and found.quantized:
            return True
    return False


def rebuild_base(run: RunFolder | None, model_name: str, tokenizer) -> tuple[nn.Module, object]:
    """The frozen base a run was trained on, built again: for GPTQ calibrated on the very examples the run
    recorded (calibration.json); a bare adapter (run None) gets the model as loaded."""
    if run is None:
        model, tokenizer = load_model(model_name)
        return model, tokenizer
    config = run.read_config()
    calibration = None
    if method_scheme(model_name, config.lora).needs_calibration:
        calibration = run.read_calibration()
        if calibration is None:  # a run from before calibration.json: encode its data as training did
            from .data import encode_run_data

            calibration = encode_run_data(config, tokenizer).train
    model, tokenizer, _ = build_base(
        model_name, config.lora, calibration, tokenizer.pad_token_id, base_cache=config.base_cache
    )
    return model, tokenizer
