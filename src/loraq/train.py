"""The training loop: AdamW on the adapter only, warmup then cosine decay, clipping, accumulation, evaluation.

A run folder holds `config.json` (the resolved configuration), `metrics.jsonl` (one JSON object per step
and per evaluation) and `adapter/` (PEFT format), each written atomically.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .config import LoraConfig
from .data import (
    IGNORE_INDEX,
    Splits,
    encode_all,
    load_examples,
    ordered_batches,
    pack,
    shuffled_batches,
    split_by_group,
)
from .errors import LoraqError
from .inject import apply, parameter_summary
from .methods import prepare_base
from .models import DEFAULT_MODEL, load_tokenizer
from .peft_format import save_adapter
from .report import write_report
from .resume import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from .tensorboard import EventWriter


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
    quantizer: str = _opt("rtn", "qalora: rtn (round to nearest; a Q4_1 GGUF's own codes at 4 bits, g32) or gptq")
    steps: int = _opt(100, "optimizer steps")
    batch_size: int = _opt(8, "examples per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-4, "peak learning rate")
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
    device: str = _opt("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    compute_dtype: str = _opt("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA only)")
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
            self.compute_dtype in ("auto", *_DTYPES),
            f"--compute-dtype must be auto, {', '.join(_DTYPES)}, got {self.compute_dtype!r}",
        )
        check(
            isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
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


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: object
    out: Path
    val_loss_before: float
    val_loss_after: float
    train_losses: list[float]
    seconds: float
    dropped_for_length: int
    truncated: int = 0
    stopped_at: int | None = None  # the step an interrupt stopped the run after (None: ran to the end)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype a run uses, checked against what this machine has.

    Raises:
        LoraqError: CUDA asked for but absent, fp16 on a CPU, or bf16 on a CPU without bf16 support.
    """
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoraqError(f"--device {config.device}: this machine has no CUDA device (torch {torch.__version__})")
    device = torch.device(name)
    dtype_name = config.compute_dtype
    if dtype_name == "auto":
        dtype_name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and dtype_name == "fp16":
        raise LoraqError("--compute-dtype fp16 needs CUDA; on a CPU use fp32 or bf16")
    if device.type == "cpu" and dtype_name == "bf16" and not cpu_supports_bf16():
        raise LoraqError(
            "--compute-dtype bf16: this CPU has no native bf16 support (no AVX512-BF16/AMX, per oneDNN); "
            "use --compute-dtype fp32"
        )
    return device, _DTYPES[dtype_name]


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check); without it bf16 is slow emulation."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (adapter weights and optimizer state stay fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


SCHEDULES = ("cosine", "linear", "constant")
# Options that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = {"resume", "overwrite", "save_every", "eval_every", "eval_batch_size"}


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule (cosine or linear
    decay to zero, or constant)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup_steps, 1)
    progress = (step - config.warmup_steps) / span
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Only positions where some row has a label get logits: with the loss on short responses this skips
    most of the (vocab-wide) output head.
    """
    labels = batch["labels"][:, 1:]
    keep = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions t predicting t+1
    kwargs = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
        labels = labels[:, keep]
    if "position_ids" in batch:  # packed: positions restart per example and transformers masks across them
        kwargs.update(position_ids=batch["position_ids"], use_cache=False)
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], **kwargs).logits
    if "logits_to_keep" not in kwargs:
        logits = logits[:, :-1]
    n = int((labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    items: list[dict],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Mean per-token loss over `items` (token-weighted, so batch size does not change it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = torch.device(device)
    for batch in ordered_batches(items, batch_size, pad_id):
        with autocast(device, dtype):
            loss, n = loss_sum(model, _to(batch, device))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer=None, progress: bool = True) -> TrainResult:
    """Fine-tune `config.model` on `config.data` with LoRA and write the run folder `config.out`.

    The run folder gets config.json, metrics.jsonl, a checkpoint every `save_every` steps (the last two are
    kept), and at the end adapter/ (PEFT format), loss.png and summary.json. Ctrl-C (SIGINT) finishes the
    current step, writes a checkpoint and returns with `stopped_at` set; `resume=True` continues from the
    last checkpoint with the same per-step losses as an uninterrupted run.

    Args:
        config: the run's options.
        model, tokenizer: an already loaded model to train instead of loading `config.model`.
        progress: show a progress bar.

    Raises:
        LoraqError: bad data or options, a run folder that holds a finished run (without `overwrite`) or an
            incompatible one (with `resume`): before any training step. A NaN or infinite loss: the run
            stops, the last good checkpoint stays.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    out = Path(config.out)
    rank, world = init_distributed(config)
    writer = rank == 0  # with several processes only rank 0 writes the run folder
    progress = progress and writer
    check_run_folder(out, config)
    device, dtype = resolve_device(config)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model)
    if config.val_data:  # all of --data trains; --val-data validates
        examples = load_examples(config.data, config.data_format)
        splits = Splits(examples, load_examples(config.val_data, config.data_format), [])
    else:
        splits = split_by_group(load_examples(config.data, config.data_format))
    encode_options = dict(drop_long=config.too_long == "drop", train_on_prompt=config.train_on_prompt)
    train_items, stats = encode_all(tokenizer, splits.train, config.max_length, **encode_options)
    val_items, val_stats = encode_all(tokenizer, splits.val or splits.test, config.max_length, **encode_options)
    if not train_items:
        raise LoraqError(f"data (--data): no training example fits --max-length {config.max_length}")
    if stats.dropped + val_stats.dropped or stats.truncated + val_stats.truncated:
        print(
            f"loraq: --max-length {config.max_length}: {stats.truncated + val_stats.truncated} examples truncated, "
            f"{stats.dropped + val_stats.dropped} dropped (prompt alone too long, or --too-long drop)"
        )
    pad_id = tokenizer.pad_token_id

    model, tokenizer, quant_errors = prepare_base(config.model, config.lora, train_items, pad_id, model, tokenizer)
    model.to(device)
    apply(model, config.lora)
    if config.grad_checkpoint:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise LoraqError(f"--grad-checkpoint: {type(model).__name__} does not support gradient checkpointing")
        # Non-reentrant checkpointing needs no input that requires grad, so the frozen embedding can stay frozen.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if writer:
        print(f"loraq: {parameter_summary(model)}" + (f" on {world} processes" if world > 1 else ""))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        if quant_errors:
            report = json.dumps({"relative_error": quant_errors}, indent=1) + "\n"
            atomic_write_text(out / "quantization.json", report)
    metrics_path = out / "metrics.jsonl"

    events = EventWriter(out / "tensorboard") if writer else None

    def log(record: dict) -> None:
        if writer:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            scalars = {f"train/{k}": v for k, v in record.items() if k in ("loss", "lr", "grad_norm", "tok_s")}
            if "val_loss" in record:
                scalars["eval/loss"] = record["val_loss"]
            events.scalars(record["step"], scalars)

    def validate() -> float:
        return evaluate_loss(model, val_items, config.eval_batch_size, pad_id, device, dtype)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.packing:
        before = len(train_items)
        train_items = pack(train_items, config.max_length, config.seed)
        if writer:
            print(
                f"loraq: packed {before} examples into {len(train_items)} sequences of up to {config.max_length} tokens"
            )
    batches = shuffled_batches(train_items, config.batch_size, pad_id, config.seed)
    first = 0
    checkpoint = latest_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        first = load_checkpoint(checkpoint, model, optimizer)
        for _ in range(first * config.grad_accum):  # the batches the run already trained on
            next(batches)
        if writer:
            truncate_metrics(metrics_path, first)
        val_before = _first_val_loss(metrics_path)
        print(f"loraq: resuming {out} from step {first}")
    else:
        if writer:
            metrics_path.unlink(missing_ok=True)
        val_before = validate() if val_items else float("nan")
        log({"step": 0, "val_loss": val_before})

    model.train()
    train_losses: list[float] = []
    val_after = val_before
    stop = _StopOnSigint()
    bar = tqdm(range(first, config.steps), desc="train", disable=not progress, dynamic_ncols=True, initial=first,
               total=config.steps)  # fmt: skip
    stopped_at = None
    with stop:
        for step in bar:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(config.grad_accum)]
            n_total = max(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro), 1)
            step_loss = 0.0
            try:
                for batch in micro:
                    shard = {k: v[rank::world] for k, v in batch.items()}  # each process its rows of the batch
                    if len(shard["input_ids"]) == 0:
                        continue
                    with autocast(device, dtype):
                        loss, _ = loss_sum(model, _to(shard, device))
                    (loss / n_total).backward()
                    step_loss += float(loss.detach()) / n_total
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_out_of_memory(e):
                    raise
                raise LoraqError(
                    f"out of memory at step {step + 1} (batch {config.batch_size} x up to {config.max_length} tokens, "
                    f"{config.method}): run `loraq plan` to size it, or use a smaller --batch-size with --grad-accum, "
                    "--grad-checkpoint, a shorter --max-length, or --method qlora/qalora"
                ) from None
            if world > 1:
                step_loss = _all_reduce_gradients(params, step_loss, device)
            if not math.isfinite(step_loss):
                last = latest_checkpoint(out)
                where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise LoraqError(
                    f"the training loss became {step_loss} at step {step + 1}; training stopped and {where}. "
                    "Try a lower --lr, a smaller --max-grad-norm, or --compute-dtype fp32"
                )
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            tok_s = tokens / (time.perf_counter() - t0)
            train_losses.append(step_loss)
            record = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
            record["tok_s"] = tok_s
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            done = step + 1 == config.steps
            if val_items and ((config.eval_every and (step + 1) % config.eval_every == 0) or done):
                val_after = validate()
                model.train()
                record["val_loss"] = val_after
                bar.write(f"step {step + 1}: val_loss {val_after:.4f}")
            log(record)
            if writer and ((config.save_every and (step + 1) % config.save_every == 0) or done or stop.requested):
                try:
                    save_checkpoint(out, step + 1, model, optimizer)
                except OSError as e:
                    last = latest_checkpoint(out)
                    kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
                    raise LoraqError(
                        f"could not write the checkpoint of step {step + 1} ({e.strerror or e}); {kept}"
                    ) from None
            if stop.requested and not done:
                stopped_at = step + 1
                bar.write(f"loraq: interrupted; checkpoint of step {step + 1} written; continue with --resume")
                break
    bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    if stopped_at is None and writer:
        save_adapter(model, out / "adapter")
        write_report(out, seconds)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(
        model, tokenizer, out, val_before, val_after, train_losses, seconds, stats.dropped, stats.truncated, stopped_at
    )


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def init_distributed(config: TrainConfig) -> tuple[int, int]:
    """(rank, world size): one process unless started by torchrun (WORLD_SIZE > 1), then the process group
    (nccl on CUDA, gloo on CPU) is joined here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and config.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_gradients(params: list[nn.Parameter], step_loss: float, device: torch.device) -> float:
    """Sum every adapter gradient and the loss over the processes: each process computed its rows' share of
    the token-weighted loss of the same global batch, so the sums are the single-process values."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    total = torch.tensor([step_loss], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)


def check_run_folder(out: Path, config: TrainConfig) -> None:
    """Refuse to overwrite a finished run (without --overwrite) or to resume an incompatible one."""
    saved_path = out / "config.json"
    if config.resume:
        if not saved_path.is_file():
            raise LoraqError(f"--resume: {out} holds no run to resume (no config.json)")
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoraqError(f"--resume: {saved_path} cannot be read ({e})") from None
        current = config.to_dict()
        changed = sorted(
            k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
        )
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise LoraqError(
                f"--resume: the options differ from the run in {out} ({details}); resume with the same options"
            )
        if latest_checkpoint(out) is None:
            raise LoraqError(f"--resume: {out} has no checkpoint yet; start it again without --resume")
        return
    if (out / "adapter").exists() and not config.overwrite:
        raise LoraqError(f"{out} already holds a finished run; pass --overwrite to replace it, or choose another --out")
    if config.overwrite:
        import shutil

        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _first_val_loss(metrics_path: Path) -> float:
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("step") == 0:
            return float(record.get("val_loss", float("nan")))
    return float("nan")


class _StopOnSigint:
    """While active, the first Ctrl-C asks the loop to stop after the current step (a second one aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
