"""Saved activations offloaded to host memory during the forward pass and brought back for backward.

With gradient checkpointing a step keeps, for backward, each decoder block's input (and the loss's hidden
states); everything inside a block is recomputed. Those inputs grow with layers x tokens (an 8B model at 1x2048
in bf16: 32 x 2048 x 4096 x 2 = 512 MiB; at 32K tokens, 8 GiB). `offload_saved(model)` moves every such tensor
to pinned host memory as autograd saves it and back to the GPU when backward needs it, as torchtune's activation
offloading and Unsloth's offloaded checkpoints do. Non-reentrant checkpointing saves a block's inputs through
the hooks that are active around it (`_NoopSaveInputs`), so these hooks see exactly the block inputs; what a
block saves internally during its recompute goes through checkpointing's own hooks and stays on the GPU.

Parameters (the frozen head, which the loss saves) are never copied: they stay on the device whatever happens.
Tensors under `min_bytes` stay too: moving them costs more than they hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

MIN_BYTES = 2**20


class OffloadStats:
    """What an offloaded forward pass moved to the host: the shapes of the tensors, and their bytes."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.bytes = 0


@contextlib.contextmanager
def offload_saved(
    model: nn.Module, host: torch.device | str = "cpu", min_bytes: int = MIN_BYTES
) -> Iterator[OffloadStats]:
    """Inside the block, tensors autograd saves for backward (bar parameters and small ones) are kept on `host`
    (pinned when it is the CPU and they come from a GPU) and copied back to their device when backward unpacks
    them. `host` is a parameter so that the mechanism runs, and is tested, on a machine without a GPU."""
    host = torch.device(host)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stats = OffloadStats()

    def pack(t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < min_bytes or t.untyped_storage().data_ptr() in params:
            return t
        pin = host.type == "cpu" and t.device.type == "cuda"
        kept = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device=host, pin_memory=pin)
        kept.copy_(t, non_blocking=pin)
        stats.shapes.append(tuple(t.shape))
        stats.bytes += nbytes
        return (t.device, kept)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, kept = packed
        return kept.to(device, non_blocking=kept.is_pinned())

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats
