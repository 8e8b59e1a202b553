"""How each method prepares its frozen base: LoRA keeps it as loaded, QLoRA stores it as NF4 with double
quantization, QA-LoRA as group-wise INT-k (the GGUF's own Q4_1 codes where the model comes from one and
INT4 g32 is asked for; else round-to-nearest or GPTQ). Training and merging both build the base here, so a
merge sees exactly the base the adapter was trained on.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from torch import nn

from ..core.config import LoraConfig
from ..errors import LoraqError
from ..formats.gguf import gguf_int_layers
from ..quant.frozen import (
    IntLinear,
    NF4Linear,
    collect_hessians,
    int_layers,
    nf4_layers,
    quantize_linears,
    quantize_model_int,
)
from ..quant.intk import relative_error
from .data import ordered_batches
from .fetch import SMOLLM2_GGUF, fetch
from .models import _ALIASES, load_model

CALIBRATION_EXAMPLES = 256


def gguf_source(model_name: str) -> Path | None:
    """The GGUF file a model name loads from, if any (the default model ships as one)."""
    if model_name.lower() in _ALIASES:
        return fetch(SMOLLM2_GGUF)
    path = Path(model_name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def uses_gguf_codes(model_name: str, config: LoraConfig) -> bool:
    return (
        config.method == "qalora"
        and config.bits == 4
        and config.group_size == 32
        and config.quantizer == "rtn"
        and gguf_source(model_name) is not None
    )


def prepare_base(
    model_name: str,
    config: LoraConfig,
    calibration: list[dict] | None = None,
    pad_id: int | None = None,
    model: nn.Module | None = None,
    tokenizer=None,
) -> tuple[nn.Module, object, dict[str, float]]:
    """Load (or take) the model and quantize its base as `config.method` wants.

    Args:
        calibration: encoded training examples for GPTQ (the first 256 are used).
        model, tokenizer: an already loaded full-precision model to quantize in place instead of loading.

    Returns:
        (model, tokenizer, relative reconstruction error ||W - Ŵ||/||W|| of each quantized layer; empty
        for LoRA or an already quantized model).
    """
    already = model is not None and any(isinstance(m, (NF4Linear, IntLinear)) for m in model.modules())
    if config.method == "lora" or already:
        if model is None:
            model, tokenizer = load_model(model_name)
        return model, tokenizer, {}
    errors: dict[str, float] = {}
    if config.method == "qalora" and config.quantizer == "gptq":
        if model is None:
            model, tokenizer = load_model(model_name)
        if not calibration:
            raise LoraqError("--quantizer gptq needs training data to calibrate on")
        n = min(len(calibration), CALIBRATION_EXAMPLES)
        print(f"loraq: GPTQ calibration on {n} training examples", file=sys.stderr)
        hessians = collect_hessians(model, ordered_batches(calibration[:n], 16, pad_id or 0))
        errors = quantize_model_int(model, config.bits, config.group_size, "gptq", hessians)
    else:
        if config.method == "qlora":
            make, what = nf4_layers(), "NF4+DQ blocksize 64"
        elif uses_gguf_codes(model_name, config):
            source = gguf_source(model_name)
            make, what = gguf_int_layers(source), f"the INT4 g32 codes stored in {source.name}"
        else:
            make, what = int_layers(config.bits, config.group_size), f"RTN INT{config.bits} g{config.group_size}"

        def measured(name: str, weight, bias):
            layer = make(name, weight, bias)
            errors[name] = relative_error(weight, layer.dequantize())
            return layer

        if model is None:
            model, tokenizer = load_model(model_name, quantize_layer=measured)
        else:
            quantize_linears(model, measured)
        print(f"loraq: base quantized as {what}", file=sys.stderr)
    print(
        f"loraq: relative weight error of the {len(errors)} quantized layers: mean "
        f"{statistics.mean(errors.values()):.4f}, max {max(errors.values()):.4f} ({max(errors, key=errors.get)})",
        file=sys.stderr,
    )
    return model, tokenizer, errors


def method_of(run_config: dict) -> LoraConfig:
    """The base-building part of a run's saved config.json (LoRA for a bare adapter: {})."""
    return LoraConfig(
        method=run_config.get("method", "lora"),
        bits=run_config.get("bits", 4),
        group_size=run_config.get("group_size", 32),
        quantizer=run_config.get("quantizer", "rtn"),
    )


def rebuild_base(model_name: str, run_config: dict, tokenizer) -> tuple[nn.Module, object]:
    """The frozen base a run was trained on, built again (GPTQ recalibrated on the same training examples,
    which is deterministic)."""
    from .data import encode_all, load_examples, split_by_group

    method = method_of(run_config)
    calibration = None
    if method.method == "qalora" and method.quantizer == "gptq":
        examples = load_examples(run_config.get("data", "e2e"), run_config.get("data_format", "auto"))
        calibration, _ = encode_all(tokenizer, split_by_group(examples).train, run_config.get("max_length", 256))
    model, tokenizer, _ = prepare_base(model_name, method, calibration, tokenizer.pad_token_id)
    return model, tokenizer
