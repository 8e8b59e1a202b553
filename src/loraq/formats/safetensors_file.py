"""Read tensors from a .safetensors file: with plain reads where they are converted, mapped where kept as is.

safetensors' own `safe_open` maps the whole file: every page a load touches stays resident, counted in the
process's RSS, until the handle closes. Loading a 7B model's 13 GB of shards that way showed 19 GB peak RSS for
a fine-tune whose own memory was 7 GB (DESIGN.md §11). So a tensor that is converted (quantized, cast) is read
(`rows`, `get_tensor`) into memory of its own with `os.preadv`: the process holds the tensor being quantized and
nothing else of the file. A tensor used exactly as stored (a quantized checkpoint's codes and constants) is
instead a view of a private mapping of the file (`mapped`): its pages are the kernel's page cache, shared and
reclaimable, never the process's own memory unless written.

The format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}, then the data, offsets counted from its start.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..errors import LoraqError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_HEADER = 100 * 2**20  # safetensors' own limit


class SafetensorsFile:
    """One .safetensors file's header, checked whole on opening; tensors read on demand.

    Raises LoraqError naming the file for a truncated file, a header that is not the format's JSON, an unknown
    dtype, or offsets that do not match a tensor's shape or lie outside the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                length = int.from_bytes(f.read(8), "little")
                if size < 8 or length > min(size - 8, MAX_HEADER):
                    self._bad(f"header length {length} does not fit a file of {size} bytes")
                header = json.loads(f.read(length))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self._bad(f"{type(e).__name__}: {e}")
        if not isinstance(header, dict):
            self._bad("the header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start, data_size = 8 + length, size - 8 - length
        self.size, self._mapping = size, None
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, entry in header.items():
            self.entries[key] = self._check(key, entry, data_size)

    def _bad(self, why: str):
        raise LoraqError(f"{self.path}: not a readable safetensors file ({why})") from None

    def _check(self, key: str, entry: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in DTYPES and all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            self._bad(f"tensor {key}: header entry {entry!r} is not dtype, shape and data_offsets")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes or end > data_size:
            self._bad(f"tensor {key}: {shape} {dtype} needs {nbytes} bytes, its offsets [{begin}, {end}] "
                      f"in {data_size} bytes of data")  # fmt: skip
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def is_float(self, key: str) -> bool:
        return self.entries[key][0] in FLOATS

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key][0]]

    def get_tensor(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self.rows(key, 0, shape[0]) if shape else self._read(key, [(0, 1)]).reshape(())

    def mapped(self, key: str) -> torch.Tensor:
        """`key` as a view of a private (copy-on-write) mapping of the file; read like `get_tensor` if its data
        is not aligned to its element size or the file cannot be mapped."""
        dtype, shape = self.dtype(key), self.shape(key)
        begin = self.data_start + self.entries[key][2]
        if begin % dtype.itemsize or not math.prod(shape):
            return self.get_tensor(key)
        if self._mapping is None:
            try:
                self._mapping = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.size)
            except RuntimeError:  # (a file system without mmap, no address space left): read instead
                self._mapping = False
        if self._mapping is False:
            return self.get_tensor(key)
        return torch.empty(0, dtype=dtype).set_(self._mapping, begin // dtype.itemsize, shape)

    def rows(self, key: str, start: int, stop: int, dim: int = 0) -> torch.Tensor:
        """Entries start:stop of `key` along `dim` (0, or 1 of a 2-D tensor), read alone from the file."""
        shape = self.shape(key)
        start, stop = max(0, min(start, shape[dim])), max(0, min(stop, shape[dim]))
        stop = max(start, stop)
        if dim == 0:
            inner = math.prod(shape[1:])
            return self._read(key, [(start * inner, (stop - start) * inner)]).reshape(stop - start, *shape[1:])
        rows, cols = shape
        spans = [(r * cols + start, stop - start) for r in range(rows)]
        return self._read(key, spans).reshape(rows, stop - start)

    def _read(self, key: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        """The elements of `key` in `spans` ((first element, count), in order), concatenated, in a new tensor."""
        dtype = self.dtype(key)
        item, base = dtype.itemsize, self.data_start + self.entries[key][2]
        out = torch.empty(sum(n for _, n in spans) * item, dtype=torch.uint8)
        view = memoryview(out.numpy())
        with open(self.path, "rb", buffering=0) as f:
            at = 0
            for first, count in spans:
                self._read_into(f.fileno(), view[at : at + count * item], base + first * item, key)
                at += count * item
        return out.view(dtype)

    def _read_into(self, fd: int, buffer: memoryview, offset: int, key: str) -> None:
        while len(buffer):
            n = os.preadv(fd, [buffer], offset)
            if n <= 0:
                self._bad(f"tensor {key}: the file ends before its data")
            buffer, offset = buffer[n:], offset + n
