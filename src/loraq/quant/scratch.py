"""Work buffers reused by every dequantize-inside-a-matmul, so that training does not allocate and free a
full-precision weight per layer per step. Freshly allocated temporaries of a few MB each, freed in a
different order every step, fragment the C heap: peak RSS grew by ~15% on the default model.

A buffer returned here is overwritten by the next call with the same name: only a caller that is done
with it before any other dequantization (the frozen matmul's forward and backward) may use it. Not
thread-safe; one training process uses one thread for this.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of `numel` elements from the buffer `name`, grown (never shrunk) as needed."""
    key = (name, torch.device(device), dtype)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        _BUFFERS[key] = buffer
    return buffer[:numel]


def release() -> None:
    """Free every work buffer (e.g. after training)."""
    _BUFFERS.clear()
