"""The training loop: AdamW on the adapter only, warmup then a schedule, clipping, accumulation, evaluation,
checkpoints and resuming, and under torchrun the model sharded over the processes with FSDP2 (distributed.py).

`train` reads top to bottom as named steps: check the run folder, pick the device, encode the data, build
the base the method names and attach the adapter, record the run, restore or start, then the loop (step,
log, validate, checkpoint) and the finish. The run folder's files are described in run_folder.py, the options
in train_config.py, the device in device.py.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..core.inject import apply, parameter_summary
from ..core.layers import Stored16Linear, set_compute_dtype
from ..errors import LoraqError
from ..formats.peft import save_adapter
from ..quant import workspace
from ..quant.frozen import quantized_tensor_ids
from .base import CALIBRATION_EXAMPLES, build_base, method_scheme
from .data import IGNORE_INDEX, RunData, encode_run_data, ordered_batches, pack, shuffled_batches
from .device import autocast, resolve_device
from .distributed import (
    barrier,
    check_world,
    full_tensor,
    gathered_trainables,
    init_distributed,
    is_dtensor,
    set_gradient_sync,
    set_threads,
    shard_model,
    sum_over_ranks,
)
from .host_memory import HostMemory, set_mmap_threshold
from .loss import chunked_head_loss
from .models import load_tokenizer, model_folder
from .offload import offload_saved
from .report import write_report
from .resume import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from .run_folder import DataRecord, RunFolder
from .sharded_load import load_sharded, note_load, sharded_source
from .tensorboard import EventWriter
from .train_config import TrainConfig, read_config_file  # noqa: F401 (re-exported)


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


# Options that may change between a run and its resumption (they do not change what is computed; "out": a
# run folder moved or copied elsewhere resumes there).
RESUMABLE_CHANGES = {
    "resume", "overwrite", "save_every", "eval_every", "eval_batch_size", "cpu_offload", "offload_activations",
    "mmap_threshold_mb", "threads", "out", "base_cache",
}  # fmt: skip


@dataclass
class StepState:
    """What every training step works with, made once by `train`: the model (sharded under torchrun), the
    trained parameters and their optimizer, where and in what dtype it computes, and which process this is."""

    config: TrainConfig
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run folder (rank 0 only)."""
        return self.rank == 0


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer=None, progress: bool = True) -> TrainResult:
    """Fine-tune `config.model` on `config.data` with LoRA and write the run folder `config.out`.

    The run folder gets config.json, data.json, metrics.jsonl, a checkpoint every `save_every` steps (the
    last two are kept), and at the end adapter/ (PEFT format), loss.png and summary.json. Ctrl-C (SIGINT)
    finishes the current step, writes a checkpoint and returns with `stopped_at` set; `resume=True` continues
    from the last checkpoint with the same per-step losses as an uninterrupted run.

    Args:
        config: the run's options.
        model, tokenizer: an already loaded model to train instead of loading `config.model`.
        progress: show a progress bar.

    Raises:
        LoraqError: bad data or options, a run folder that holds a finished run (without `overwrite`) or an
            incompatible one (with `resume`): before any training step. A NaN or infinite loss: the run
            stops, the last good checkpoint stays.
    """
    if config.mmap_threshold_mb and not set_mmap_threshold(config.mmap_threshold_mb):
        print("loraq: note: --mmap-threshold-mb needs glibc's malloc; ignored here", file=sys.stderr)
    with HostMemory() as host:
        return _train(config, model, tokenizer, progress, host)


def _train(config: TrainConfig, model: nn.Module | None, tokenizer, progress: bool, host: HostMemory) -> TrainResult:
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    run = RunFolder(config.out)
    rank, world = init_distributed(config.device)
    writer = rank == 0  # with several processes only rank 0 writes the run folder
    device, dtype = resolve_device(config, rank, world)
    check_world(config.batch_size, world, config.cpu_offload, device.type)
    threads = set_threads(config.threads, device.type)
    if threads and writer:
        print(f"loraq: {threads}", file=sys.stderr)
    if config.offload_activations and device.type != "cuda":
        raise LoraqError("--offload-activations moves saved activations from a GPU to host memory; this runs on a CPU")
    check_run_folder(run, config)  # (after every check of the options: --overwrite clears old checkpoints)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # under torchrun each process its own GPU, for nccl too
    tokenizer = tokenizer or load_tokenizer(config.model)
    data = _encode_data(config, tokenizer)
    loading = time.perf_counter()
    host.phase("load")
    model = _build_model(config, data, model, tokenizer, device, dtype, writer, world, run)
    load_seconds = time.perf_counter() - loading
    host.phase("train")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # fp16 autocast (a GPU without bf16) needs loss scaling; disabled, the scaler passes everything through
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = StepState(config, model, params, optimizer, scaler, device, dtype, rank, world)
    log = _MetricsLog(run, writer)
    batches = _batches(config, data, tokenizer.pad_token_id, writer)

    # On a CPU validation computes in fp32 even when training is in bf16: the figure is then the one `loraq eval`
    # and a deployed model give (a forward pass costs little beside a step)
    val_dtype = torch.float32 if device.type == "cpu" else dtype

    def validate() -> float:
        return evaluate_loss(
            model, data.val, config.eval_batch_size, tokenizer.pad_token_id, device, val_dtype, rank=rank, world=world
        )

    with workspace.attached(model, _checkpointed_blocks(model, dtype)), _StopOnSigint() as stop:
        first, val_before = _restore_or_start(state, run, batches, log, validate, bool(data.val))
        val_after, losses, stopped_at = val_before, [], None
        model.train()
        bar = tqdm(range(first, config.steps), desc="train", disable=not (progress and writer), dynamic_ncols=True,
                   initial=first, total=config.steps)  # fmt: skip
        for step in bar:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(config.grad_accum)]
            loss = _forward_backward(state, micro, step)
            # every rank must agree on the loss (its check) and on stopping (a checkpoint is a collective)
            loss, stopping = sum_over_ranks([loss, float(stop.requested)], device)
            _stop_unless_finite(loss, step, run)
            record = _optimizer_step(state, step, loss, micro, t0)
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tok_s']:.0f}")
            done = step + 1 == config.steps
            if data.val and ((config.eval_every and (step + 1) % config.eval_every == 0) or done):
                val_after = record["val_loss"] = validate()
                model.train()
                if writer:
                    bar.write(f"step {step + 1}: val_loss {val_after:.4f}")
            log(record)
            if (config.save_every and (step + 1) % config.save_every == 0) or done or stopping:
                _checkpoint(run, step + 1, state)
            if stopping and not done:
                stopped_at = step + 1
                if writer:
                    bar.write(f"loraq: interrupted; checkpoint of step {step + 1} written; continue with --resume")
                break
        bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    if stopped_at is None:
        with gathered_trainables(model):  # every rank gathers the adapter; rank 0 writes it
            if writer:
                save_adapter(model, run.adapter_dir)
                peaks = {k: host.peak(k) for k in ("anonymous", "files")}
                peaks["anonymous_load"] = host.peaks.get("load", {}).get("anonymous")
                write_report(run.path, seconds, peaks, load_seconds=load_seconds)
    barrier()
    return TrainResult(
        model, tokenizer, run.path, val_before, val_after, losses, seconds, data.dropped, data.truncated, stopped_at
    )


def _encode_data(config: TrainConfig, tokenizer) -> RunData:
    data = encode_run_data(config, tokenizer)
    if not data.train:
        raise LoraqError(f"data (--data): no training example fits --max-length {config.max_length}")
    if data.dropped or data.truncated:
        print(
            f"loraq: --max-length {config.max_length}: {data.truncated} examples truncated, {data.dropped} dropped "
            "(prompt alone too long, or --too-long drop)"
        )
    return data


def _build_model(
    config: TrainConfig,
    data: RunData,
    model: nn.Module | None,
    tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    writer: bool,
    world: int,
    run: RunFolder,
) -> nn.Module:
    """The base the method names, on the device, with the adapter attached (under torchrun: sharded, each
    process loading only its rows where the model comes from a safetensors folder); recorded in the run folder."""
    scheme = method_scheme(config.model, config.lora)
    calibration = data.train[:CALIBRATION_EXAMPLES] if scheme.needs_calibration else None

    def prepare(model: nn.Module) -> None:  # before the model moves to the device (or gets memory at all)
        if device.type == "cuda":
            frozen_to(model, dtype)  # the frozen base in 16 bits on a GPU (cast before it moves there)
        _attach_adapter(model, config)
        _grad_checkpointing(model, config)

    folder = model_folder(config.model) if model is None and world > 1 else None
    if sharded_source(folder, scheme):
        model, quant_errors = load_sharded(folder, scheme, device, prepare, config.cpu_offload)
        if writer:
            note_load(quant_errors, world)
    else:
        if world > 1 and writer:
            source = "the model handed to train" if model is not None else config.model
            print(
                f"loraq: note: {source} loads whole on every process, then is sharded (safetensors folders load "
                "by rows, but not for GPTQ, which calibrates on the whole model)",
                file=sys.stderr,
            )
        model, _, quant_errors = build_base(
            config.model, config.lora, calibration, tokenizer.pad_token_id, model, tokenizer, device, config.base_cache
        )
        prepare(model)
        model.to(device)
        if world > 1:
            shard_model(model, device, config.cpu_offload)
    if writer:
        print(f"loraq: {parameter_summary(model)}" + (f" on {world} processes" if world > 1 else ""))
        if device.type == "cpu" and config.compute_dtype == "auto" and dtype == torch.bfloat16:
            print("loraq: computing in bf16 autocast (this CPU has native bf16; --compute-dtype fp32 to change)")
        run.write_config(config)
        record = DataRecord(len(data.train), len(data.val), data.truncated, data.dropped, len(calibration or []))
        run.write_data(record, calibration)
        if quant_errors:
            report = json.dumps({"relative_error": quant_errors}, indent=1) + "\n"
            atomic_write_text(run.path / "quantization.json", report)
    return model


def _grad_checkpointing(model: nn.Module, config: TrainConfig) -> None:
    if not config.grad_checkpoint:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LoraqError(f"--grad-checkpoint: {type(model).__name__} does not support gradient checkpointing")
    # Non-reentrant checkpointing needs no input that requires grad, so the frozen embedding can stay frozen.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _checkpointed_blocks(model: nn.Module, dtype: torch.dtype) -> list[nn.Module]:
    """The decoder blocks transformers' gradient checkpointing recomputes (none where it is off), whose frozen
    layers keep the recompute's weight for the backward. Not under fp32 compute: there the matmuls dominate
    (a dequantization is ~5% of a 7B step) and a block of fp32 weights costs 0.8 GB; in 16 bits the
    dequantizations are a third of the step and the block half that."""
    if dtype == torch.float32:
        return []
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return [block for blocks in lists for block in blocks if getattr(block, "gradient_checkpointing", False)]


def frozen_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter of the base (embeddings, norms, full-precision weights, biases) to
    `dtype`; adapters (and so their AdamW state) stay fp32, and quantized layers keep their codes and constants
    exactly as stored (a cast of an fp16 scale to bf16 would change the weights)."""
    constants = quantized_tensor_ids(model)
    for name, p in model.named_parameters():
        if p.is_floating_point() and ".adapters." not in name and id(p) not in constants:
            p.data = p.data.to(dtype)
    set_compute_dtype(model, dtype)


def _attach_adapter(model: nn.Module, config: TrainConfig) -> None:
    """Apply the run's adapter, or train the one already applied to a model handed in, if it is the same."""
    existing = getattr(model, "loraq_configs", {}).get(config.lora.adapter_name)
    if existing is None:
        apply(model, config.lora)
        return
    wanted = config.lora.to_dict()
    differ = {k: (v, wanted[k]) for k, v in existing.to_dict().items() if v != wanted[k]}
    if differ:
        details = ", ".join(f"{k}={a!r} (TrainConfig: {b!r})" for k, (a, b) in differ.items())
        raise LoraqError(
            f"the model already holds adapter {config.lora.adapter_name!r} with {details}; give the TrainConfig "
            "the same options, or pass a model without an adapter and let train apply it"
        )


def _batches(config: TrainConfig, data: RunData, pad_id: int, writer: bool) -> Iterator[dict[str, torch.Tensor]]:
    items = data.train
    if config.packing:
        items = pack(items, config.max_length, config.seed)
        if writer:
            print(f"loraq: packed {len(data.train)} examples into {len(items)} sequences of {config.max_length} tokens")
    return shuffled_batches(items, config.batch_size, pad_id, config.seed)


def _restore_or_start(state: StepState, run: RunFolder, batches, log, validate, has_val: bool) -> tuple[int, float]:
    """Resume from the last checkpoint (skipping the batches it trained on), or measure the start; return the
    first step to run and the validation loss before training."""
    config = state.config
    checkpoint = latest_checkpoint(run.path) if config.resume else None
    barrier()  # every rank has looked for the checkpoint before rank 0 may write a new one
    if checkpoint is None:
        if state.writer:
            run.metrics_path.unlink(missing_ok=True)
        val_before = validate() if has_val else float("nan")
        log({"step": 0, "val_loss": val_before})
        return 0, val_before
    first = load_checkpoint(checkpoint, state.model, state.optimizer)
    for _ in range(first * config.grad_accum):
        next(batches)
    if state.writer:
        truncate_metrics(run.metrics_path, first)
        where = f" on {state.world} processes" if state.world > 1 else ""
        print(f"loraq: resuming {run.path} from step {first}{where}")
    return first, _first_val_loss(run.metrics_path)


def _forward_backward(state: StepState, micro: list[dict], step: int) -> float:
    """Accumulate the gradients of one optimizer step's micro-batches (this process's rows of each); return
    this process's share of the step's token-weighted loss. Out of memory ends the run with what to do."""
    config, rank, world = state.config, state.rank, state.world
    n_total = max(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro), 1)
    step_loss = 0.0
    try:
        for i, batch in enumerate(micro):
            shard = {k: v[rank::world] for k, v in batch.items()}  # check_world: every rank has rows
            set_gradient_sync(state.model, i == len(micro) - 1)
            with autocast(state.device, state.dtype), _offloading(state):
                loss, _ = loss_sum(state.model, _to(shard, state.device))
            state.scaler.scale(loss / n_total).backward()
            step_loss += float(loss.detach()) / n_total
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        raise LoraqError(
            f"out of memory at step {step + 1} (batch {config.batch_size} x up to {config.max_length} tokens, "
            f"{config.method}): run `loraq plan` to size it, or use a smaller --batch-size with --grad-accum, "
            "--grad-checkpoint, a shorter --max-length, or --method qlora/qalora"
        ) from None
    return step_loss


def _offloading(state: StepState) -> contextlib.AbstractContextManager:
    """--offload-activations: the block inputs checkpointing keeps go to host memory until backward (offload.py)."""
    if state.config.offload_activations:  # (refused before loading on anything but a GPU)
        return offload_saved(state.model)
    return contextlib.nullcontext()


def _stop_unless_finite(loss: float, step: int, run: RunFolder) -> None:
    if math.isfinite(loss):
        return
    last = latest_checkpoint(run.path)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise LoraqError(
        f"the training loss became {loss} at step {step + 1}; training stopped and {where}. "
        "Try a lower --lr, a smaller --max-grad-norm, or --compute-dtype fp32"
    )


def _optimizer_step(state: StepState, step: int, loss: float, micro, t0: float) -> dict:
    """Clip, set the scheduled learning rate, step AdamW; return the step's metrics record."""
    config, optimizer, scaler = state.config, state.optimizer, state.scaler
    scaler.unscale_(optimizer)
    grads = [p.grad for p in state.params if p.grad is not None]
    # the norm of sharded gradients is a sum over the processes: made whole before it scales anything
    norm = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))
    torch.nn.utils.clip_grads_with_norm_(state.params, config.max_grad_norm, norm, foreach=True)
    grad_norm = float(norm)
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    tok_s = tokens / (time.perf_counter() - t0)
    return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tok_s": tok_s}


def _checkpoint(run: RunFolder, step: int, state: StepState) -> None:
    try:
        save_checkpoint(run.path, step, state.model, state.optimizer, write=state.writer)
    except OSError as e:
        last = latest_checkpoint(run.path)
        kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
        raise LoraqError(f"could not write the checkpoint of step {step} ({e.strerror or e}); {kept}") from None


class _MetricsLog:
    """metrics.jsonl and TensorBoard events, written by rank 0 only."""

    def __init__(self, run: RunFolder, writer: bool):
        self.run, self.writer = run, writer
        self.events = EventWriter(run.tensorboard_dir) if writer else None

    def __call__(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.run.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"train/{k}": v for k, v in record.items() if k in ("loss", "lr", "grad_norm", "tok_s")}
        if "val_loss" in record:
            scalars["eval/loss"] = record["val_loss"]
        self.events.scalars(record["step"], scalars)


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


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    `chunked` (where the model's head is a plain frozen linear layer): the head and the loss run a chunk of
    labelled positions at a time and the logits never exist whole (loss.py). Otherwise only positions where
    some row has a label get logits: with the loss on short responses this skips most of the output head.
    """
    labels = batch["labels"][:, 1:]
    keep = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions t predicting t+1
    kwargs = {}
    if "position_ids" in batch:  # packed: positions restart per example and transformers masks across them
        kwargs.update(position_ids=batch["position_ids"], use_cache=False)
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    accepts_keep = _accepts_logits_to_keep(model)
    head = _plain_head(model) if chunked and accepts_keep else None
    if head is not None:
        none = torch.zeros(0, dtype=torch.long, device=keep.device)  # the model computes no logits at all
        out = model(input_ids=batch["input_ids"], logits_to_keep=none, output_hidden_states=True, **kwargs)
        labelled = labels != IGNORE_INDEX
        hidden = out.hidden_states[-1][:, :-1][labelled]  # (N, H): the positions that carry a label
        targets, n = labels[labelled], int(labelled.sum())
        if is_dtensor(head.weight):  # an FSDP2 unit of its own, sharded again after the forward pass:
            logits = head(hidden).float()  # its own call gathers it (the labelled rows' logits, at once)
            return F.cross_entropy(logits, targets, reduction="sum"), n
        return chunked_head_loss(hidden, head.weight, head.bias, targets), n
    if accepts_keep:
        kwargs["logits_to_keep"] = keep
        labels = labels[:, keep]
    logits = model(input_ids=batch["input_ids"], **kwargs).logits
    if "logits_to_keep" not in kwargs:
        logits = logits[:, :-1]
    n = int((labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


# config fields of models whose logits are more than the head's output (Gemma 2's soft-capping, Cohere's and
# Granite's scales): they keep the full-logit loss
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head where the chunked loss can stand in for it: a frozen plain linear layer whose output is
    the logits as they are. Decided from these facts alone, never from the moment's sharding state, so that a
    run computes the same way at every step (an FSDP2 root's weight is whole after a forward pass, sharded
    between steps)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if type(head) not in (nn.Linear, Stored16Linear) or head.weight.requires_grad:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return head


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
    rank: int = 0,
    world: int = 1,
) -> float:
    """Mean per-token loss over `items` (token-weighted, so batch size does not change it).

    With `world` processes (a collective: every rank calls it) each takes every world-th item and the sums are
    added up; a rank with one batch fewer runs one forward pass on a single token instead, since a sharded model
    gathers every block from every rank in each forward pass."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = torch.device(device)
    mine = items[rank::world]
    most = -(-len(items[::world]) // batch_size)  # rank 0 has the most items
    for batch in ordered_batches(mine, batch_size, pad_id):
        with autocast(device, dtype):
            loss, n = loss_sum(model, _to(batch, device))
        total, count = total + float(loss), count + n
    for _ in range(most - -(-len(mine) // batch_size)):
        with autocast(device, dtype):
            model(input_ids=torch.full((1, 1), pad_id, device=device))
    total, count = sum_over_ranks([total, count], device) if world > 1 else (total, count)
    model.train(was_training)
    return total / max(count, 1)


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def check_run_folder(run: RunFolder, config: TrainConfig) -> None:
    """Refuse to overwrite a finished run (without --overwrite) or to resume an incompatible one."""
    if config.resume:
        if not run.started:
            raise LoraqError(f"--resume: {run.path} holds no run to resume (no config.json)")
        saved, current = run.read_config().to_dict(), config.to_dict()
        changed = sorted(k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
            raise LoraqError(
                f"--resume: the options differ from the run in {run.path} ({details}); resume with the same options"
            )
        if latest_checkpoint(run.path) is None:
            raise LoraqError(f"--resume: {run.path} has no checkpoint yet; start it again without --resume")
        return
    if run.finished and not config.overwrite:
        raise LoraqError(
            f"{run.path} already holds a finished run; pass --overwrite to replace it, or choose another --out"
        )
    if config.overwrite:
        for stale in (run.checkpoints_dir, run.tensorboard_dir):  # the replaced run's; the rest is rewritten
            shutil.rmtree(stale, ignore_errors=True)


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
