"""Checkpoints of a training run, and resuming from the last one with bit-identical results on CPU.

A checkpoint is a folder `checkpoints/step-NNNNNN/` in the run folder, written atomically:
`trainable.safetensors` (the adapter parameters by name), `optimizer.safetensors` (AdamW's moment tensors and
the RNG states) and `trainer.json` (the step, AdamW's scalar state, the learning-rate schedule position).
Resuming restores all of it and skips the batches already seen, so the next steps compute exactly what
the uninterrupted run would have. The two most recent checkpoints are kept.

Under several processes (FSDP2) the tensors are gathered whole before they are written (every rank takes part,
rank 0 writes), and cut again to each rank's shard when read: the files are those of one process, so a run
saved by 2 processes resumes in 1, and the reverse.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_folder
from ..errors import LoraqError
from .distributed import full_tensor, shard_like

KEEP = 2


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(
    out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, write: bool = True
) -> Path:
    """Write the checkpoint of `step` (atomically) and drop all but the newest KEEP.

    Under several processes every rank calls this (the sharded tensors are gathered) and only the one with
    `write` writes."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    params = {names[id(p)]: _whole(p.detach()) for g in optimizer.param_groups for p in g["params"]}
    state, scalars = {}, {}
    for index, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                state[f"{index}.{key}"] = _whole(value.detach())
            else:
                scalars[f"{index}.{key}"] = float(value)
    state["rng.torch"] = torch.get_rng_state()
    target = checkpoint_dir(out, step)
    if not write:
        return target
    with atomic_folder(target) as tmp:
        save_file(params, str(tmp / "trainable.safetensors"))
        save_file(state, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "optimizer_scalars": scalars}) + "\n")
    for old in sorted((out / "checkpoints").glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _whole(t: torch.Tensor) -> torch.Tensor:
    return full_tensor(t).cpu().contiguous()


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    done = [p for p in sorted((out / "checkpoints").glob("step-*")) if (p / "trainer.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore the adapter, the optimizer and the RNG from a checkpoint; return its step.

    Raises:
        LoraqError: a file is missing or corrupt, or the checkpoint does not fit this model.
    """
    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        params = load_file(str(path / "trainable.safetensors"))
        state = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise LoraqError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # safetensors' own error type for corrupt files
        raise LoraqError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e})") from None
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(params):
        raise LoraqError(f"checkpoint {path} holds other parameters than this run trains; was the config changed?")
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != params[name].shape:
                raise LoraqError(
                    f"checkpoint {path}: {name} has shape {tuple(params[name].shape)}, not {tuple(p.shape)}"
                )
            p.copy_(shard_like(params[name].to(p.dtype), p))
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    for index, p in enumerate(ordered):
        entry = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if f"{index}.{key}" in state:
                entry[key] = shard_like(state[f"{index}.{key}"], p)
        if f"{index}.step" in meta["optimizer_scalars"]:
            entry["step"] = torch.tensor(meta["optimizer_scalars"][f"{index}.step"])
        if entry:
            optimizer.state[p] = entry
    torch.set_rng_state(state["rng.torch"])
    return int(meta["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines of steps <= `step` (a killed run may have logged steps after its last
    checkpoint; the resumed run logs them again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
