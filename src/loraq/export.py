"""Merge a trained adapter into its base and write the result: a 16-bit Hugging Face folder, or the merged
weights re-quantized to 4 bits, with the error each rounding step adds measured on validation prompts.

For a QLoRA run the adapter was trained on the NF4 base, so the merge adds it to the *dequantized* NF4
weights (what training saw), not to the original full-precision ones.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_folder
from .data import encode_all, load_examples, ordered_batches, split_by_group
from .errors import LoraqError
from .inject import lora_layers, merge
from .models import load_model
from .peft_format import load_adapter, read_adapter_config
from .quant.checkpoint import write_quantized
from .quant.linear import NF4Linear, quantize_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REQUANTIZE = ("nf4", "fp4")


@dataclass
class MergeReport:
    out: Path
    dtype: str
    requantize: str | None
    prompts: int
    merged_error: float  # mean |logits(merged as written) - logits(base + adapter)|, 16-bit case
    requantize_error: float | None  # the same for the re-quantized model

    def __str__(self) -> str:
        text = f"merged model in {self.out} ({self.dtype}); mean |delta logits| vs the adapted model on "
        text += f"{self.prompts} validation prompts: {self.merged_error:.4f} after {self.dtype} rounding"
        if self.requantize_error is not None:
            text += f", {self.requantize_error:.4f} after re-quantizing to {self.requantize}"
        return text


def resolve_run(run_or_adapter: str | os.PathLike) -> tuple[Path, dict]:
    """The adapter folder and the run's training config ({} for a bare adapter folder)."""
    path = Path(run_or_adapter)
    if (path / "adapter" / "adapter_config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoraqError(f"{path / 'config.json'}: cannot read the run's config ({e})") from None
        return path / "adapter", config
    if (path / "adapter_config.json").is_file():
        return path, {}
    raise LoraqError(f"{path}: neither a run folder (with adapter/) nor an adapter folder (with adapter_config.json)")


def merge_run(
    run_or_adapter: str | os.PathLike,
    out: str | os.PathLike,
    model: str | None = None,
    dtype: str = "bf16",
    requantize: str | None = None,
    data: str | None = None,
    prompts: int = 16,
) -> MergeReport:
    """Merge a run's adapter into its base model and write a Hugging Face folder to `out`.

    Args:
        run_or_adapter: a run folder written by `train` (its config names the model, method and data) or a
            PEFT adapter folder (then `model` is needed, or the adapter's base_model_name_or_path is used).
        out: the folder to write (atomically); `AutoModelForCausalLM.from_pretrained(out)` loads it.
        model: the base model, overriding the run's.
        dtype: "bf16", "fp16" or "fp32" for the written weights.
        requantize: None, or "nf4"/"fp4" to quantize the merged weights again (NF4 with double quantization)
            and write that 4-bit folder instead; the added error is reported.
        data: validation data for the error report, overriding the run's ("e2e" by default).
        prompts: how many validation examples to measure on.

    Raises:
        LoraqError: a bad option, run folder, adapter or model.
    """
    if dtype not in DTYPES:
        raise LoraqError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if requantize is not None and requantize not in REQUANTIZE:
        raise LoraqError(f"--requantize must be one of {', '.join(REQUANTIZE)}, got {requantize!r}")
    if prompts < 1:
        raise LoraqError(f"--prompts must be >= 1, got {prompts}")
    adapter_dir, run_config = resolve_run(run_or_adapter)
    read_adapter_config(adapter_dir)  # checks the config before the (slow) model load
    model_name = model or run_config.get("model") or _adapter_base_name(adapter_dir)
    if not model_name:
        raise LoraqError(f"{adapter_dir}: the base model is unknown; pass --model")
    base, tokenizer = load_model(model_name)
    if run_config.get("method") == "qlora" and not any(isinstance(m, NF4Linear) for m in base.modules()):
        quantize_model(base)
    load_adapter(base, adapter_dir)
    if not lora_layers(base):
        raise LoraqError(f"{adapter_dir}: the adapter attached to no layer of {model_name}")

    batches = _validation_batches(tokenizer, data or run_config.get("data") or "e2e", prompts)
    reference = _logits(base, batches)
    merged = merge(base)
    written = copy.deepcopy(merged).to(DTYPES[dtype])
    merged_error = _mean_abs_delta(_logits(written, batches), reference)
    requantize_error = None
    if requantize:
        quantize_model(merged, quant_type=requantize)
        requantize_error = _mean_abs_delta(_logits(merged, batches), reference)
    with atomic_folder(out) as tmp:
        if requantize:
            write_quantized(merged, tokenizer, tmp)
        else:
            written.config.torch_dtype = DTYPES[dtype]
            written.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return MergeReport(Path(out), dtype, requantize, sum(len(b[0]) for b in batches), merged_error, requantize_error)


def _adapter_base_name(adapter_dir: Path) -> str | None:
    raw = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return raw.get("base_model_name_or_path")


def _validation_batches(tokenizer, data: str, prompts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    splits = split_by_group(load_examples(data))
    items, _ = encode_all(tokenizer, (splits.val or splits.test or splits.train)[:prompts], 256)
    if not items:
        raise LoraqError(f"data {data!r}: no validation example to measure the merge on")
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
