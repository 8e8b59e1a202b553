"""The quantized base kept on disk: quantized once, then mapped from the file by every later run.

Quantizing a 7B model's 16-bit shards into NF4 or INT4 takes minutes on a CPU and gives the same bytes every
time. The first run that builds a base from a local safetensors folder writes it as a quantized checkpoint
(`save_quantized`'s format) under `$LORAQ_CACHE/bases/`; that run and every later one (training again, resuming,
merging, exporting, evaluating) load it from there. `load_quantized` maps the file's tensors instead of reading
them: the frozen codes and constants are then the kernel's page cache, shared by every process that maps the file
and reclaimable, not the process's own (anonymous) memory — as llama.cpp runs its models. A checkpoint's
tensors are never written in place except by a merge, which copies the touched pages (a private mapping).

The folder's name hashes what the bytes depend on: the source's files (names, sizes, modification and change
times, inodes), the scheme's parameters, the device the quantization ran on, and loraq's and torch's versions
with a hash of the quantizers' source. "auto" caches bases whose source holds at least `AUTO_MIN_BYTES`; small
models quantize in seconds and stay out of the cache. Old folders are never deleted: remove $LORAQ_CACHE/bases
to reclaim the space.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..atomic import atomic_folder
from ..errors import LoraqError
from ..formats.checkpoint import is_quantized_folder, load_quantized, write_quantized
from ..quant.schemes import Scheme
from .fetch import cache_dir

CHOICES = ("auto", "on", "off")
AUTO_MIN_BYTES = 2**30
META = "loraq-base.json"


def _source_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.safetensors"), folder / "config.json"])


def _code_version() -> str:
    """loraq's and torch's versions and a hash of the quantizers' source: a change to either builds anew."""
    try:
        version = importlib.metadata.version("loraq")
    except importlib.metadata.PackageNotFoundError:  # (run from a source tree)
        version = "unknown"
    quant = Path(__file__).resolve().parent.parent / "quant"
    digest = hashlib.sha256()
    for path in sorted([*quant.rglob("*.py"), *quant.rglob("*.c")]):
        digest.update(path.read_bytes())
    return f"loraq {version} {digest.hexdigest()[:16]}, torch {torch.__version__}"


def cache_folder(source: Path | None, scheme: Scheme, choice: str, device_type: str) -> Path | None:
    """Where the base of `scheme` built from the model folder `source` on `device_type` is (or will be) cached
    under the option `choice`; None if it does not go through the cache."""
    return _folder(source, scheme, device_type) if _cacheable(source, scheme, choice) else None


def _cacheable(folder: Path | None, scheme: Scheme, choice: str) -> bool:
    if choice not in CHOICES:
        raise LoraqError(f"--base-cache must be {', '.join(CHOICES[:-1])} or {CHOICES[-1]}, got {choice!r}")
    if choice == "off" or folder is None or not scheme.quantized or scheme.needs_calibration:
        return False
    sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
    if not sizes or is_quantized_folder(folder):
        return False
    return choice == "on" or sum(sizes) >= AUTO_MIN_BYTES


def _folder(folder: Path, scheme: Scheme, device_type: str) -> Path:
    stats = [(p.name, p.stat()) for p in _source_files(folder) if p.is_file()]
    files = [(name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) for name, st in stats]
    key = {
        "source": str(folder.resolve()),
        "files": files,
        "scheme": scheme.checkpoint_config(),
        "describe": scheme.describe(),
        "device": device_type,
        "code": _code_version(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "bases" / f"{folder.resolve().name}-{digest}"


def load_cached(where: Path) -> tuple[nn.Module, dict[str, float]] | None:
    """The cached base (tensors mapped from its file) and the quantization errors measured when it was built;
    None if there is none (or an unfinished one, which the next store replaces)."""
    meta = where / META
    if not meta.is_file():
        return None
    try:
        recorded = json.loads(meta.read_text(encoding="utf-8"))
        errors, name = dict(recorded["relative_error"]), recorded["name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"loraq: note: the cached base {where} is unreadable; quantizing again", file=sys.stderr)
        shutil.rmtree(where, ignore_errors=True)
        return None
    try:
        model = load_quantized(where)
    except LoraqError as e:  # (a truncated or damaged file: built again and replaced)
        print(f"loraq: note: the cached base is damaged ({e}); quantizing again", file=sys.stderr)
        shutil.rmtree(where, ignore_errors=True)
        return None
    model.name_or_path = name
    print(f"loraq: base mapped from the cache {where} (--base-cache off to quantize again)", file=sys.stderr)
    return model, errors


def store(model: nn.Module, errors: dict[str, float], where: Path) -> bool:
    """Write `model`'s quantized base to the cache folder `where`, whole or not at all; False (and a note) if
    it cannot be written (a full disk, a read-only cache): the run goes on with the base in memory."""
    if (where / META).is_file():  # (another run finished it meanwhile)
        return True
    try:
        with atomic_folder(where) as tmp:
            write_quantized(model, None, tmp)
            record = {"relative_error": errors, "name_or_path": getattr(model, "name_or_path", None)}
            (tmp / META).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as e:
        print(f"loraq: note: cannot cache the quantized base in {where} ({e}); keeping it in memory", file=sys.stderr)
        return False
    size = sum(p.stat().st_size for p in where.iterdir()) / 2**30
    print(f"loraq: quantized base cached in {where} ({size:.2f} GiB); later runs map it", file=sys.stderr)
    return True
