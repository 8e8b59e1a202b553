"""Where a run computes: the device and compute dtype (checked against the machine) and mixed precision.
Several processes under torchrun are distributed.py's."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import LoraqError
from .train_config import TrainConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(config: TrainConfig, rank: int = 0, world: int = 1) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype a run uses, checked against what this machine has (under torchrun on
    CUDA, each process its own GPU).

    "auto" is bf16 autocast on CUDA, or fp16 (with loss scaling) on a GPU without bf16; on a CPU bf16 autocast
    where the CPU computes bf16 natively (AMX / AVX512-BF16: matmuls 5x faster than fp32 on this project's
    machines, validation loss within 0.01 of fp32 after 150 steps, README), else fp32.

    Raises:
        LoraqError: CUDA asked for but absent, a CUDA device number this machine lacks (the message lists the
            ones it has), bf16 on a GPU or CPU without it, or fp16 on a CPU.
    """
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoraqError(f"--device {config.device}: this machine has no CUDA device (torch {torch.__version__})")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        present = ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count()))
        raise LoraqError(f"--device {config.device}: no such CUDA device; this machine has {present}")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype_name = config.compute_dtype
    if dtype_name == "auto":
        dtype_name = auto_compute_dtype(device.type, cuda_bf16)
    if device.type == "cuda" and dtype_name == "bf16" and not cuda_bf16:
        raise LoraqError(
            f"--compute-dtype bf16: {torch.cuda.get_device_name(device)} has no bf16; use --compute-dtype fp16 "
            "(autocast with loss scaling) or fp32"
        )
    if device.type == "cpu" and dtype_name == "fp16":
        raise LoraqError("--compute-dtype fp16 needs CUDA; on a CPU use fp32 or bf16")
    if device.type == "cpu" and dtype_name == "bf16" and not cpu_supports_bf16():
        raise LoraqError(
            "--compute-dtype bf16: this CPU has no native bf16 support (no AVX512-BF16/AMX, per oneDNN); "
            "use --compute-dtype fp32"
        )
    return device, _DTYPES[dtype_name]


def auto_compute_dtype(device_type: str, cuda_bf16: bool = True) -> str:
    """What --compute-dtype auto means on `device_type`: on CUDA bf16 autocast (fp16 with loss scaling on a GPU
    without bf16, `cuda_bf16` False); on a CPU bf16 where it computes bf16 natively, else fp32."""
    if device_type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "bf16" if cuda_bf16 else "fp16"


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
