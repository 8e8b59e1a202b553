"""Several processes under torchrun: the process group, FSDP2 sharding of the model (the quantized base and the
adapter alike), and the few collectives the training loop needs.

One process is the plain path and none of this runs. Under torchrun each decoder block is one FSDP2 unit
(`fully_shard`), then the root (an untied embedding and head as units of their own), so every process keeps
1/N of every tensor, codes and constants included (they are frozen parameters, laid out rows first: see
quant/frozen.py), and gathers one block at a time to compute it. Gradients are summed, not averaged, over the
processes: each computes its rows' share of the global batch's token-weighted loss, so the sum is the
one-process gradient.

Every function here that communicates is a collective: every rank must call it, in the same order (a
collective entered by one rank alone waits until the process group's timeout).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LoraqError

# How long a rank waits on a collective before it gives up (a peer that hangs without dying); a peer that dies
# is seen sooner: torchrun stops the others.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("LORAQ_COLLECTIVE_TIMEOUT", "600")))


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world size): one process unless started by torchrun (WORLD_SIZE > 1); then the process group (nccl
    on CUDA, gloo on CPU) is joined here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def set_threads(requested: int, device_type: str) -> str | None:
    """This process's intra-op (OpenMP) threads: `requested` where > 0; else, under torchrun on a CPU run, the
    machine's cores shared among its processes. torchrun sets OMP_NUM_THREADS=1 for its processes when it is
    unset, so two processes on 16 cores would use 2 of them; an OMP_NUM_THREADS other than 1 is the user's and
    is kept. Returns the line to log (None: nothing chosen here)."""
    if requested > 0:
        torch.set_num_threads(requested)
        return f"{requested} threads per process (--threads)"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if device_type != "cpu" or local <= 1 or os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return f"{threads} threads per process ({cores} cores / {local} processes on this machine; --threads to choose)"


def check_world(batch_size: int, world: int, cpu_offload: bool, device: str = "cuda") -> None:
    """Refuse options that cannot run on `world` processes, naming them.

    Raises:
        LoraqError: --cpu-offload without torchrun or on a CPU run (where everything already is in host
            memory), or a --batch-size that the processes cannot split evenly (every process must run every
            forward pass: FSDP gathers each block from all of them).
    """
    if cpu_offload and world == 1:
        raise LoraqError(
            "--cpu-offload keeps the shards of several processes in host memory; start the run with "
            "`torchrun --nproc-per-node N -m loraq train ...` (N >= 2), or drop --cpu-offload"
        )
    if cpu_offload and device == "cpu":
        raise LoraqError("--cpu-offload moves GPU shards to host memory; a CPU run keeps them there already")
    if world > 1 and batch_size % world:
        raise LoraqError(
            f"--batch-size {batch_size} does not split over {world} processes; use a multiple of {world} "
            "(with --grad-accum for the same global batch)"
        )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: its largest ModuleList (Llama's model.layers, GPT-2's transformer.h)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise LoraqError(f"{type(model).__name__} has no list of decoder blocks to shard across processes")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard_model(model: nn.Module, device: torch.device, cpu_offload: bool = False) -> None:
    """Shard `model` over every process with FSDP2: each decoder block a unit, an untied embedding and head a
    unit each, the rest (norm, tied embedding) the root. No mixed-precision policy: it would cast the fp16
    group constants to bf16 and change the weights; autocast does the compute dtype instead."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    units: list[nn.Module] = list(decoder_blocks(model))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and embedding is not None and head.weight is not embedding.weight:
        units += [embedding, head]
    for unit in [*units, model]:
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # summed gradients (see the module's docstring)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: a plain sum


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduces gradients over the processes (off for all but the last micro-batch
    of a step: they accumulate unsharded, and one reduction follows)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a sharded (distributed) tensor, as FSDP2 makes its parameters."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (no communication), or `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective), or `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut the way `like` is sharded (this rank's part; no communication), or `full` for a plain `like`."""
    from torch.distributed.tensor import distribute_tensor

    if not is_dtensor(like):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def local_bytes(t: torch.Tensor) -> int:
    """The bytes of `t` this process holds (its shard of a sharded tensor)."""
    local = local_tensor(t)
    return local.numel() * local.element_size()


@contextlib.contextmanager
def gathered_trainables(model: nn.Module) -> Iterator[None]:
    """While inside, every trainable parameter of a sharded model is whole on every rank (a collective on
    entry), so adapter code that reads them (save_adapter) runs unchanged; the sharded ones come back on exit.
    Only the adapter is gathered, never the base."""
    swapped = []
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and is_dtensor(p):
                module._parameters[name] = nn.Parameter(p.detach().full_tensor(), requires_grad=False)
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the processes (float64), or the values themselves in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_prefix() -> str:
    """'rank N: ' under torchrun (so that the one error line names the process), else ''."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def shutdown() -> None:
    """Leave the process group (a clean exit; torchrun otherwise warns of a leaked group)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a peer already gone: nothing left to tidy
            print(f"loraq: {rank_prefix()}process group not closed cleanly ({e})", file=sys.stderr)
