"""The process's resident memory as the kernel splits it: anonymous (the process's own: tensors and what the
allocator keeps) and file-backed (mapped files such as safetensors shards, pages the kernel can drop and read
again). A peak RSS that counts a model's mapped shards overstates what a fine-tune needs (DESIGN.md §11), so
the run summary reports the two apart.

Read from /proc/self/status by a background thread; where there is no /proc (not Linux) the peaks stay empty.
"""

from __future__ import annotations

import threading
from pathlib import Path

STATUS = Path("/proc/self/status")
FIELDS = {"VmRSS": "rss", "RssAnon": "anonymous", "RssFile": "files"}


def read_status() -> dict[str, int]:
    """This process's resident bytes now: {"rss", "anonymous", "files"} ({} without /proc)."""
    try:
        text = STATUS.read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            found[FIELDS[key]] = int(value.split()[0]) * 1024
    return found


class HostMemory(threading.Thread):
    """Peak resident bytes of each kind, per phase (`phase("train")`), sampled every `interval` seconds while
    active (a context manager)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True, name="loraq-host-memory")
        self.interval, self.current, self.peaks = interval, "run", {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        peak = self.peaks.setdefault(self.current, {})
        for kind, value in read_status().items():
            peak[kind] = max(peak.get(kind, 0), value)

    def phase(self, name: str) -> None:
        self.sample()
        self.current = name
        self.sample()

    def peak(self, kind: str) -> int | None:
        """The peak of `kind` over every phase (None without /proc)."""
        values = [p[kind] for p in self.peaks.values() if kind in p]
        return max(values) if values else None

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def __enter__(self) -> HostMemory:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def set_mmap_threshold(mib: int) -> bool:
    """Ask glibc to give every allocation of `mib` MiB or more pages of its own, returned to the system when
    freed, so that host memory follows the live tensors. glibc's default threshold grows to 32 MiB as big
    blocks are freed; the activations of a CPU step (8-22 MiB each on a 7B model) then land in the heap, where
    freed space stays counted in RSS (measured on a 7B-shaped QLoRA step: peak 2,724 MiB by default, 2,096 at
    4 MiB, 6% slower from the page faults of fresh pages; DESIGN.md §11). Returns False where the C library is
    not glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mib) * 2**20)) if hasattr(libc, "mallopt") else False
    except OSError:
        return False
