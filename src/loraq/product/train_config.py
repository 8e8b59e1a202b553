"""The options of a training run: `TrainConfig` (every field is a `loraq train` flag of the same name, and a
key of a `--config` YAML file), validated once, every bad option named in one error."""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..core.config import LoraConfig
from ..errors import LoraqError
from .base_cache import CHOICES as BASE_CACHE_CHOICES
from .models import DEFAULT_MODEL

SCHEDULES = ("cosine", "linear", "constant")
# Each method's peak learning rate from `bench/qalora.py --sweep` (default model and data, 150 steps, batch 8,
# r=16 alpha=32; README "Measured results"): the best deployed validation loss for QLoRA and QA-LoRA. LoRA's
# loss was lowest at 4e-3 (0.952) but only 0.007 below 2e-3, whose generations score better (ROUGE-L 0.543 vs
# 0.504), so it gets 2e-3 too. Group constants alone (rank 0) train a scale and an offset per group of 32
# weights: each moves a whole group, and wants a larger step than an adapter's.
BEST_LR = {"lora": 2e-3, "qlora": 2e-3, "qalora": 2e-3, "qalora, constants only": 1e-2}
# Below rank 16 an adapter wants a larger rate: alpha = 2r keeps s = alpha / r fixed, and under Adam B·A sums fewer
# rank-one steps of the same size. At r=4 (bench/qalora.py --rank 4, three seeds) LoRA, DoRA, QA-LoRA and QA-DoRA
# were each best at 4e-3-8e-3, 0.03-0.06 of validation loss below 2e-3; sqrt(16 / r) gives 4e-3 there. Above 16 the
# rates were not measured: they stay.
SWEPT_RANK = 16


def default_lr(method: str, rank: int, train_constants: str) -> float:
    """The learning rate a run gets when it names none: the method's best at rank 16, times sqrt(16 / rank) below."""
    if method == "qalora" and rank == 0 and train_constants != "none":
        return BEST_LR["qalora, constants only"]
    rate = BEST_LR.get(method, BEST_LR["lora"])
    return rate * math.sqrt(SWEPT_RANK / rank) if 0 < rank < SWEPT_RANK else rate


COMPUTE_DTYPES = ("fp32", "bf16", "fp16")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is a `loraq train` flag of the same name."""

    model: str = _opt(DEFAULT_MODEL, "model: 'smollm2-135m', a Hugging Face folder, a .gguf file or a hub id")
    data: str = _opt(
        "e2e", "data: 'e2e' (the default task), hf:owner/name[:split], or a .jsonl/.json/.csv/.parquet/.txt file"
    )
    val_data: str = _opt("", "validation data file (default: 10% of --data, split by group, never trained on)")
    data_format: str = _opt("auto", "record format: auto, alpaca, chat, prompt-completion, text or bigbench")
    method: str = _opt(
        "lora", "lora; qlora (NF4 4-bit base, double quantization); qalora (INT-k base, group-pooled adapter)"
    )
    rank: int = _opt(16, "LoRA rank r")
    alpha: float = _opt(32.0, "LoRA alpha; the update is scaled by alpha/rank")
    dropout: float = _opt(0.0, "dropout on the adapter input")
    targets: str | list[str] = _opt(
        "all-linear", "layers to adapt: 'all-linear', names like q_proj,v_proj, or re:REGEX"
    )
    use_rslora: bool = _opt(False, "rank-stabilised scaling alpha/sqrt(rank)")
    bits: int = _opt(4, "qalora: bits of the INT-k base (2, 3, 4 or 8)")
    group_size: int = _opt(32, "qalora: quantization group size = the adapter's pooling window")
    quantizer: str = _opt(
        "auto",
        "auto (the method's default), qlora: nf4 or fp4; qalora: rtn (round to nearest; a Q4_1 GGUF's own codes "
        "at 4 bits, g32) or gptq (calibrated on 256 training examples)",
    )
    pooling: str = _opt(
        "sum", "qalora: sum (trains at LoRA's learning rates) or mean (adapters before loraq 0.2) pooling"
    )
    train_constants: str = _opt(
        "none", "qalora: also train each group's constants: none, offset, scale or both (--rank 0: only them)"
    )
    dora: bool = _opt(
        False, "DoRA: also train a magnitude per output row (PEFT's use_dora); with --rank 0 only the magnitudes"
    )
    steps: int = _opt(100, "optimizer steps")
    batch_size: int = _opt(8, "examples per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float | None = _opt(
        None,
        "peak learning rate (default: the method's best in bench/qalora.py --sweep, see BEST_LR; below rank 16 "
        "times sqrt(16 / rank))",
    )
    schedule: str = _opt("cosine", "learning-rate schedule after warmup: cosine, linear (both to zero) or constant")
    warmup_steps: int = _opt(10, "linear warmup steps before the schedule")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    max_length: int = _opt(256, "maximum tokens per example")
    too_long: str = _opt("truncate", "examples longer than --max-length: truncate, or drop (counted either way)")
    train_on_prompt: bool = _opt(False, "put the loss on the prompt too, not only on the response")
    packing: bool = _opt(False, "pack short examples into sequences of --max-length (no attention across them)")
    eval_every: int = _opt(50, "validation every N steps (0: only at the end)")
    eval_batch_size: int = _opt(16, "examples per validation batch")
    seed: int = _opt(0, "random seed")
    save_every: int = _opt(50, "write a checkpoint every N steps (0: only at the end); the last two are kept")
    resume: bool = _opt(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _opt(False, "replace a finished run already in --out")
    grad_checkpoint: bool = _opt(False, "gradient checkpointing: recompute activations in backward to save memory")
    offload_activations: bool = _opt(
        False, "with --grad-checkpoint on a GPU: keep each block's saved input in host memory until backward"
    )
    mmap_threshold_mb: int = _opt(
        0,
        "host memory: allocations of at least this many MiB get pages of their own, returned when freed (glibc; "
        "0: the default). 4 cuts a 7B CPU step's peak by a quarter at a few percent of its time",
    )
    base_cache: str = _opt(
        "auto",
        "keep the quantized base of a local safetensors folder on disk ($LORAQ_CACHE/bases) and map it from there "
        "in this and later runs: on, off, or auto (sources of 1 GiB or more)",
    )
    threads: int = _opt(
        0, "CPU threads per process (0: torch's default; under torchrun the cores shared among the processes)"
    )
    device: str = _opt("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    cpu_offload: bool = _opt(
        False, "under torchrun: keep each process's shard of the model in host memory (FSDP2 CPU offload)"
    )
    compute_dtype: str = _opt(
        "auto", "auto (bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32), fp32, bf16 or fp16 (CUDA only)"
    )
    out: str = _opt("runs/run", "run folder")
    lora: LoraConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(is_int(self.steps) and self.steps >= 1, f"--steps must be a positive integer, got {self.steps!r}")
        check(is_int(self.batch_size) and self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size!r}")
        check(is_int(self.grad_accum) and self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum!r}")
        if self.lr is None:
            self.lr = default_lr(self.method, self.rank, self.train_constants)
        check(is_num(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr!r}")
        check(
            is_int(self.warmup_steps) and self.warmup_steps >= 0,
            f"--warmup-steps must be >= 0, got {self.warmup_steps!r}",
        )
        check(
            is_num(self.weight_decay) and self.weight_decay >= 0,
            f"--weight-decay must be >= 0, got {self.weight_decay!r}",
        )
        check(
            is_num(self.max_grad_norm) and self.max_grad_norm > 0,
            f"--max-grad-norm must be > 0, got {self.max_grad_norm!r}",
        )
        check(
            is_int(self.max_length) and self.max_length >= 8,
            f"--max-length must be an integer >= 8, got {self.max_length!r}",
        )
        check(
            is_int(self.eval_every) and self.eval_every >= 0,
            f"--eval-every must be >= 0 (0: only at the end), got {self.eval_every!r}",
        )
        check(
            is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
            f"--eval-batch-size must be >= 1, got {self.eval_batch_size!r}",
        )
        check(is_int(self.seed), f"--seed must be an integer, got {self.seed!r}")
        check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check(self.too_long in ("truncate", "drop"), f"--too-long must be truncate or drop, got {self.too_long!r}")
        check(
            is_int(self.save_every) and self.save_every >= 0,
            f"--save-every must be >= 0 (0: only at the end), got {self.save_every!r}",
        )
        check(
            self.compute_dtype in ("auto", *COMPUTE_DTYPES),
            f"--compute-dtype must be auto, {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}",
        )
        check(
            isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        check(is_int(self.threads) and self.threads >= 0, f"--threads must be an integer >= 0, got {self.threads!r}")
        check(
            is_int(self.mmap_threshold_mb) and 0 <= self.mmap_threshold_mb <= 32,
            f"--mmap-threshold-mb must be an integer from 0 to 32 (MiB), got {self.mmap_threshold_mb!r}",
        )
        check(
            self.base_cache in BASE_CACHE_CHOICES,
            f"--base-cache must be {', '.join(BASE_CACHE_CHOICES[:-1])} or {BASE_CACHE_CHOICES[-1]}, "
            f"got {self.base_cache!r}",
        )
        check(
            not self.offload_activations or self.grad_checkpoint,
            "--offload-activations offloads the block inputs gradient checkpointing keeps: add --grad-checkpoint",
        )
        check(
            not (self.offload_activations and self.device == "cpu"),
            "--offload-activations moves saved activations from the GPU to host memory; a CPU run keeps them there",
        )
        try:
            self.lora = LoraConfig(
                r=self.rank,
                alpha=self.alpha,
                dropout=self.dropout,
                targets=self.targets,
                use_rslora=self.use_rslora,
                method=self.method,
                bits=self.bits,
                group_size=self.group_size,
                quantizer=self.quantizer,
                pooling=self.pooling,
                train_constants=self.train_constants,
                use_dora=self.dora,
            )
        except LoraqError as e:
            problems.append(str(e).removeprefix("invalid LoRA config: "))
        if problems:
            raise LoraqError("invalid training options: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("lora")
        return d

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """A config from a YAML file of option names (as in `loraq train --help`, with _ or -), with
        `overrides` on top. Unknown keys are refused with the closest valid key suggested."""
        return cls(**{**read_config_file(path), **overrides})


def read_config_file(path: str | os.PathLike) -> dict:
    """The options in a YAML config file, keys normalised to TrainConfig field names and checked."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraqError(f"--config: {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LoraqError(f"--config: {path} is not valid YAML ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LoraqError(f"--config: {path} must hold a mapping of option: value, not {type(raw).__name__}")
    names = [f.name for f in fields(TrainConfig) if f.init]
    options = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LoraqError(f"--config: {path}: unknown option {key!r}{hint}")
        options[name] = value
    return options
