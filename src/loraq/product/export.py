"""Merge a trained adapter into the base it was trained on and write the result in the format a runtime
loads, measuring on validation prompts the error each rounding step adds.

The base is rebuilt exactly as training built it (base.rebuild_base, from what the run folder recorded): for
QLoRA the adapter is added to the *dequantized* NF4 weights (what training saw); for QA-LoRA it is folded into
the INT-k group offsets,
codes untouched, so the merged model is as large as the base and exact up to fp16 offsets (GGUF Q4_1 keeps
that; GPTQ's integer zero points round it, and the report says by how much).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_folder
from ..core.config import LoraConfig
from ..core.inject import dequantize_base, lora_layers, merge, unload
from ..core.layers import replace_module
from ..errors import LoraqError
from ..formats.checkpoint import write_quantized
from ..formats.gguf import write_gguf
from ..formats.gptq import gptq_tensors, int_layer_from_gptq, write_gptq
from ..formats.peft import adapter_base_model, load_adapter, read_adapter_config, save_adapter
from ..quant.frozen import IntLinear
from ..quant.schemes import scheme_named, scheme_of
from .base import rebuild_base
from .data import encode_all, ordered_batches, run_splits
from .models import gguf_source, load_tokenizer, method_scheme
from .run_folder import resolve_run
from .train_config import TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = ("hf", "gguf", "gptq", "peft")
REQUANTIZE = ("nf4", "fp4", "int2", "int3", "int4", "int8")
REQUANTIZE_GROUP = 32


@dataclass
class MergeReport:
    out: Path
    format: str
    dtype: str
    requantize: str | None
    prompts: int
    error: float  # mean |logits(what was written) - logits(base + adapter)| on validation prompts
    exact_error: float | None  # the same for the exact INT merge, when the format had to round it (gptq)
    bytes_written: int
    # per layer merged in its own format: (its format, ||W_written - W_trained|| / ||W_trained - W_base||, the
    # share of the adapter's update the format could not hold: 0 for an exact merge)
    layer_errors: dict[str, tuple[str, float]] = field(default_factory=dict)

    def by_format(self) -> dict[str, tuple[int, float, float]]:
        """format -> (layers, mean and max share of the update lost)."""
        out: dict[str, list[float]] = {}
        for kind, error in self.layer_errors.values():
            out.setdefault(kind, []).append(error)
        return {k: (len(v), sum(v) / len(v), max(v)) for k, v in sorted(out.items())}

    def __str__(self) -> str:
        what = {"hf": f"Hugging Face folder ({self.dtype})", "gguf": "GGUF", "gptq": "GPTQ folder"}.get(
            self.format, "PEFT adapter"
        )
        if self.requantize:
            what += f", re-quantized to {self.requantize}"
        text = f"wrote {what} to {self.out} ({self.bytes_written / 2**20:.1f} MiB); mean |delta logits| vs the "
        text += f"adapted model on {self.prompts} validation prompts: {self.error:.5f}"
        if self.exact_error is not None:
            text += f" (the exact merge before this format's rounding: {self.exact_error:.5f})"
        for kind, (n, mean, worst) in self.by_format().items():
            text += f"\n  {n} layers in {kind}: share of the update the format lost: mean {mean:.4f}, max {worst:.4f}"
        return text


def merge_run(
    run_or_adapter: str | os.PathLike,
    out: str | os.PathLike,
    format: str = "hf",
    model: str | None = None,
    dtype: str = "bf16",
    requantize: str | None = None,
    data: str | None = None,
    prompts: int = 16,
    allow_pickle: bool = False,
) -> MergeReport:
    """Merge a run's adapter into the base it was trained on and write the result.

    Args:
        run_or_adapter: a run folder written by `train` (it names the model, method and data) or a PEFT
            adapter folder (then `model` is needed, or the adapter's base_model_name_or_path is used).
        out: where to write (atomically): a folder for hf/gptq/peft, a .gguf file for gguf.
        format: "hf" (a 16-bit folder `AutoModelForCausalLM.from_pretrained` loads; with `requantize` a
            quantized checkpoint: nf4/fp4 in the bitsandbytes layout, int-k loraq's), "gguf" (Q4_1; needs INT4
            g32 layers and a GGUF source: a qalora run on a GGUF model merges exactly), "gptq" (INT-k with
            integer zero points: rounds a QA-LoRA merge), or "peft" (the adapter alone, QA-LoRA expanded).
        dtype: "bf16", "fp16" or "fp32" for the hf format's weights.
        requantize: quantize the merged weights again: "nf4", "fp4" or "int2/3/4/8" (RTN, group 32). Lossy;
            the error is reported. Refused where the merge keeps the base quantized (QA-LoRA): it is exact.
        data: validation data for the error report, overriding the run's ("e2e" by default).
        prompts: how many validation examples to measure on.
        allow_pickle: also read a legacy pickle adapter (adapter_model.bin). Pickle can run code.

    Raises:
        LoraqError: a bad option, run folder, adapter or model, or a format the merged model cannot take.
    """
    _check_options(format, dtype, requantize, prompts)
    adapter_dir, run = resolve_run(run_or_adapter)
    adapter_config = read_adapter_config(adapter_dir)  # checks the config before the (slow) model load
    config = run.read_config() if run else None
    constants = (config.lora if config else adapter_config).train_constants
    if constants != "none" and format in ("peft", "gptq"):
        why = "a LoRA adapter cannot hold them" if format == "peft" else "its integer zero points cannot hold them"
        raise LoraqError(
            f"--format {format} cannot hold the group constants this run trained (--train-constants {constants}): "
            f"{why}; export --format gguf or hf"
        )
    model_name = model or (config.model if config else None) or adapter_base_model(adapter_dir)
    if not model_name:
        raise LoraqError(f"{adapter_dir}: the base model is unknown; pass --model")
    lora = config.lora if config else LoraConfig()
    base_scheme = method_scheme(model_name, lora)
    if requantize and base_scheme.quantized and base_scheme.merges_in_format(lora.pool):
        raise LoraqError(
            f"--requantize: this adapter merges into its {base_scheme.describe()} base in that base's own format, "
            "which stays quantized; export it without re-quantizing"
        )
    if format == "gguf" and gguf_source(model_name) is None:
        raise LoraqError(
            f"--format gguf copies the source GGUF's metadata, but {model_name!r} was not loaded from a GGUF"
        )
    base, tokenizer = rebuild_base(run, model_name, load_tokenizer(model_name))
    load_adapter(base, adapter_dir, allow_pickle=allow_pickle)
    if not lora_layers(base):
        raise LoraqError(f"{adapter_dir}: the adapter attached to no layer of {model_name}")
    batches = _validation_batches(tokenizer, data, config, prompts)
    reference = _logits(base, batches)
    n_prompts = sum(len(b[0]) for b in batches)
    out = Path(out)
    if format == "peft":
        plain = dequantize_base(copy.deepcopy(unload(copy.deepcopy(base))))
        with atomic_folder(out) as tmp:
            save_adapter(base, tmp)
            load_adapter(plain, tmp)
        error = _mean_abs_delta(_logits(plain, batches), reference)
        return MergeReport(out, format, dtype, None, n_prompts, error, None, _size(out))
    layer_errors = _merge_in_format(base)
    merged = merge(base)
    if requantize:
        scheme_named(requantize, REQUANTIZE_GROUP).quantize_model(merged)
    report = _write_merged(merged, tokenizer, out, format, dtype, requantize, batches, reference, model_name)
    report.layer_errors = layer_errors
    return report


@torch.no_grad()
def _merge_in_format(model: nn.Module) -> dict[str, tuple[str, float]]:
    """Merge every adapter that its base takes in its own format (exactly or to the nearest), measuring for each
    layer the share of the update the stored format lost."""
    errors = {}
    for name, layer in lora_layers(model).items():
        if layer.active is None or not layer.merges_in_format() or not scheme_of(layer.base).quantized:
            continue
        base = layer.base
        scheme = scheme_of(base)
        before = scheme.dequantize(base)
        trained = layer.adapters[layer.active]
        update = trained.delta_weight().to(before.device)
        if trained.trains_constants:  # the layer computed with its trained constants: that weight was trained
            update = base.adjusted_weight(torch.float32, trained.gamma, trained.delta) - before + update
        if trained.dora:  # DoRA's weight is k·(W0 + ΔW), k = m / ||W0 + ΔW|| per row
            update = trained.merged_weight(before) - before
        layer.merge()
        written = scheme.dequantize(base)
        lost = float((written - before - update).norm() / update.norm().clamp(min=1e-30))
        errors[name] = (scheme.describe(), lost)
    return errors


def _check_options(format: str, dtype: str, requantize: str | None, prompts: int) -> None:
    problems = []
    if format not in FORMATS:
        problems.append(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if requantize is not None and requantize not in REQUANTIZE:
        problems.append(f"--requantize must be one of {', '.join(REQUANTIZE)}, got {requantize!r}")
    if prompts < 1:
        problems.append(f"--prompts must be >= 1, got {prompts}")
    if problems:
        raise LoraqError("; ".join(problems))


def _write_merged(
    merged: nn.Module, tokenizer, out: Path, format: str, dtype: str, requantize, batches, reference, model_name: str
) -> MergeReport:
    """Write the merged model in `format`, measuring its logits against the adapted model's (`reference`)."""
    n_prompts = sum(len(b[0]) for b in batches)
    exact_error = None
    if format == "gguf":
        error = _mean_abs_delta(_logits(merged, batches), reference)
        target = out if out.suffix == ".gguf" else out / "model.gguf"
        write_gguf(merged, gguf_source(model_name), target)
        return MergeReport(target, format, dtype, requantize, n_prompts, error, None, _size(target))
    if format == "gptq":
        exact_error = _mean_abs_delta(_logits(merged, batches), reference)
        with atomic_folder(out) as tmp:
            write_gptq(merged, tokenizer, tmp)
        rounded = _gptq_rounded(merged)
        error = _mean_abs_delta(_logits(rounded, batches), reference)
        return MergeReport(out, format, dtype, requantize, n_prompts, error, exact_error, _size(out))
    if requantize:
        error = _mean_abs_delta(_logits(merged, batches), reference)
        with atomic_folder(out) as tmp:
            write_quantized(merged, tokenizer, tmp)
        return MergeReport(out, format, dtype, requantize, n_prompts, error, None, _size(out))
    written = dequantize_base(merged).to(DTYPES[dtype])
    error = _mean_abs_delta(_logits(written, batches), reference)
    with atomic_folder(out) as tmp:
        written.config.torch_dtype = DTYPES[dtype]
        written.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return MergeReport(out, format, dtype, requantize, n_prompts, error, None, _size(out))


def _gptq_rounded(model: nn.Module) -> nn.Module:
    """A copy of `model` whose INT-k layers carry the integer zero points a GPTQ file stores."""
    rounded = copy.deepcopy(model)
    for name, module in list(rounded.named_modules()):
        if isinstance(module, IntLinear):
            tensors, _ = gptq_tensors(module)
            replace_module(rounded, name, int_layer_from_gptq(tensors, module.bits, module.group_size, module.bias))
    return rounded


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _validation_batches(
    tokenizer, data: str | None, config: TrainConfig | None, prompts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation prompts of `data`, else of the run's data (its --val-data where it had one), else E2E."""
    if data:
        splits = run_splits(data)
    elif config is not None:
        splits = run_splits(config.data, config.data_format, config.val_data)
    else:
        splits = run_splits("e2e")
    items, _ = encode_all(tokenizer, (splits.val or splits.test or splits.train)[:prompts], 256)
    if not items:
        raise LoraqError(f"data {data or 'of the run'}: no validation example to measure the merge on")
    return [(b["input_ids"], b["attention_mask"]) for b in ordered_batches(items, 8, tokenizer.pad_token_id)]


@torch.no_grad()
def _logits(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    model.eval()
    out = []
    for ids, mask in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        out.append(logits[mask.bool()])  # real tokens only, not padding
    return out


def _mean_abs_delta(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total = sum(float((x - y).abs().sum()) for x, y in zip(a, b))
    return total / sum(x.numel() for x in a)
