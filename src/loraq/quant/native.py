"""The CPU dequantization of NF4/FP4 and INT4 in C (quant/native.c), built on first use with the machine's own C
compiler and called through ctypes; the PyTorch path (quant/nf4.py, quant/intk.py) wherever it cannot be.

Why: on a CPU a training step dequantizes every frozen weight twice, and the table lookup PyTorch offers
(`index_select`) plus the per-piece Python around it ran at 0.7 ns a value, slower than bitsandbytes' C kernel
in bf16: a third of a 7B step. The C loops decode 16 values per instruction where the CPU has AVX-512 (a 16-entry
code table is one register) and write bf16 directly, bit for bit what the PyTorch path writes (tests/test_native.py).

Nothing to install: one C file (no Python or PyTorch headers), compiled in ~0.2 s with `$CC` or `cc` into the
loraq cache, keyed by the source, the flags and the CPU's feature flags (a cache shared by two machines never
hands one the other's instructions). No compiler, a failed build, or `LORAQ_NATIVE=0`: the PyTorch path, with
one line on stderr saying why. The threads are Python's (ctypes lets go of the GIL during a call), as many as
`torch.get_num_threads()`, each decoding a contiguous run of whole blocks or groups.

Two small helpers of DoRA's training step live here too (core/lora.py): the row norms over an INT-k base from its
groups' code sums, and the magnitudes' gradient Σ_t g·y in one pass; a dozen PyTorch ops each, which on a CPU
cost more in dispatch and memory traffic than their arithmetic.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]  # no FMA: the PyTorch path rounds the product first
TUNED = ["-march=native"]  # this CPU's instructions (AVX-512 where it has them); dropped if the compiler refuses
SERIAL_BELOW = 1 << 16  # values: fewer than this are decoded in the calling thread
OUTPUTS = (torch.float32, torch.bfloat16)


def enabled() -> bool:
    """Whether the C path is allowed (`LORAQ_NATIVE=0` turns it off) and built."""
    return os.environ.get("LORAQ_NATIVE", "1") != "0" and library() is not None


@cache
def library() -> ctypes.CDLL | None:
    """The built library (once per process), or None with one line on stderr saying why not."""
    try:
        path = build()
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        print(f"loraq: CPU dequantization in PyTorch ({e}); set CC to a C compiler for the faster one", file=sys.stderr)
        return None
    return load(path)


def load(path: Path) -> ctypes.CDLL:
    """A built library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("nf4_f32", "nf4_bf16", "int4_f32", "int4_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [pointer, pointer, pointer, size, size, size, pointer]
        fn.restype = None
    for name in ("nf4_gemv", "int4_gemv"):
        fn = getattr(lib, name)
        fn.argtypes = [pointer, pointer, pointer, size, size, pointer, size, size, size, pointer, size]
        fn.restype = None
    lib.column_dots_bf16.argtypes = [pointer, pointer, size, size, size, size, pointer]
    lib.column_dots_bf16.restype = None
    lib.dora_group_norms.argtypes = [pointer, pointer, size, size, ctypes.c_float, pointer, pointer, pointer, size,
                                     pointer, size, size, pointer]  # fmt: skip
    lib.dora_group_norms.restype = None
    return lib


def build(extra: tuple[str, ...] = (), folder: Path | None = None) -> Path:
    """Compile native.c into `folder` (default the loraq cache) unless an identical build is there; its path.

    Raises:
        RuntimeError: no C compiler, or it failed with and without -march=native.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        raise RuntimeError("no C compiler found")
    source = SOURCE.read_bytes()
    errors = []
    for tuned in (TUNED, []):
        flags = [*FLAGS, *tuned, *extra]
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu()])).hexdigest()
        target = (folder or _cache()) / f"dequantize-{key[:16]}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dequantize-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            if done.returncode == 0:
                os.replace(tmp, target)  # (complete or absent: two processes building at once both succeed)
                return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors[-1][0]}")


def _cache() -> Path:
    from ..product.fetch import cache_dir

    return cache_dir() / "native"


def _cpu() -> bytes:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    flags = b""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    return platform.machine().encode() + platform.processor().encode() + flags


def usable(out_dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether a dequantization of these tensors into `out_dtype` runs in C: CPU tensors, fp32/bf16 out."""
    return out_dtype in OUTPUTS and all(t.device.type == "cpu" for t in tensors) and enabled()


def nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    """Decode the `out.numel()` values of `packed` (two per byte, the high nibble first): code[nibble] times the
    fp32 absmax of its block, into `out` (fp32 or bf16, contiguous). `blocksize` even."""
    fn = library().nf4_bf16 if out.dtype == torch.bfloat16 else library().nf4_f32
    args = (packed.contiguous(), absmax.float().contiguous(), code.float().contiguous())
    _split(fn, out, blocksize, *args, blocksize)


def int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int, out: torch.Tensor) -> None:
    """Decode INT4 codes (two per byte, the low nibble first), each group of `group` values code·scale + offset
    (fp32, two roundings), into `out` (fp32 or bf16, contiguous): `out.numel()` a multiple of `group`, even."""
    fn = library().int4_bf16 if out.dtype == torch.bfloat16 else library().int4_f32
    _split(fn, out, group, packed.contiguous(), scale.float().contiguous(), offset.float().contiguous(), group)


# Rows (tokens) up to which a frozen layer multiplies by its codes without forming the weight (at most MAX_ROWS
# in native.c). Measured (bench/dequantize.py --gemv): against dequantize-then-matmul the C loop takes 0.1-0.3x
# the time in fp32 up to 16 rows; in bf16, where the matmul itself is fast, 0.2-0.7x up to 4 rows and up to
# 1.5x at 16.
FEW_ROWS = {torch.float32: 16, torch.bfloat16: 4, torch.float16: 4}


def gemv_usable(x: torch.Tensor, dtype: torch.dtype, in_features: int, unit: int) -> bool:
    """Whether the `*_gemv` functions take x (..., in) for a matmul in `dtype`: a few rows on a CPU, and chunks
    of 32 values inside each block / group."""
    return (
        x.device.type == "cpu"
        and x.numel() <= FEW_ROWS.get(dtype, 0) * in_features
        and in_features % 32 == 0
        and unit % 32 == 0
        and enabled()
    )


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
             out_features: int) -> torch.Tensor:  # fmt: skip
    """x (..., in) times the NF4 weight's transpose, in fp32, the weight decoded in registers and never written."""
    return _gemv(library().nf4_gemv, x, out_features, packed.contiguous(), absmax.float().contiguous(),
                 code.float().contiguous(), blocksize)  # fmt: skip


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
              out_features: int) -> torch.Tensor:  # fmt: skip
    """x (..., in) times the INT4 weight's transpose, in fp32, the weight decoded in registers and never written."""
    return _gemv(library().int4_gemv, x, out_features, packed.contiguous(), scale.float().contiguous(),
                 offset.float().contiguous(), group)  # fmt: skip


def column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Σ over the rows of a·b for each column of two bf16 CPU tensors of one shape (..., cols), fp32 (cols,), in one
    pass (DoRA's magnitude gradient); None where the C path cannot take them."""
    if not (a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape and a.device.type == "cpu" and enabled()):
        return None
    cols = a.shape[-1]
    a2, b2 = a.reshape(-1, cols).contiguous(), b.reshape(-1, cols).contiguous()
    out = torch.empty(cols)
    # (one pass over memory: below ~4M values handing columns to the pool cost more than a second thread gained,
    # 1024 x 576: 158 us in this thread, 280 us on two)
    threads = torch.get_num_threads() if a2.numel() >= 1 << 22 else 1
    per = -(-cols // threads // 16) * 16  # (whole vectors of columns per thread)
    fn, rows = library().column_dots_bf16, a2.shape[0]
    _parallel([(fn, a2.data_ptr(), b2.data_ptr(), rows, cols, c, min(cols, c + per), out.data_ptr())
               for c in range(0, cols, per)])  # fmt: skip
    return out


def dora_group_norms(b: torch.Tensor, a: torch.Tensor, c: float, scale: torch.Tensor, offset: torch.Tensor,
                     sums: torch.Tensor, group: int, base_sq: torch.Tensor) -> torch.Tensor | None:  # fmt: skip
    """DoRA's row norms over an INT-k base under an A pooled over its groups, fp32 (out,): sqrt(base_sq + Σ_g d·(2·G +
    group·d)), d = c·B·A, G = scale·sums + group·offset (see core/lora.py's `_dora_norm_by_groups`, the same in
    PyTorch). None where the C path cannot take the tensors (CPU; B, A, base_sq fp32; scale, offset fp16; sums
    int16)."""
    tensors = (b, a, scale, offset, sums, base_sq)
    dtypes = (torch.float32, torch.float32, torch.float16, torch.float16, torch.int16, torch.float32)
    if any(t.dtype != d or t.device.type != "cpu" for t, d in zip(tensors, dtypes)) or not enabled():
        return None
    b, a, scale, offset, sums, base_sq = (t.contiguous() for t in tensors)
    (out_features, rank), groups = b.shape, a.shape[1]
    norm = torch.empty(out_features)
    pointers = [t.data_ptr() for t in (scale, offset, sums)]
    library().dora_group_norms(b.data_ptr(), a.data_ptr(), rank, groups, c, *pointers, group, base_sq.data_ptr(), 0,
                               out_features, norm.data_ptr())  # fmt: skip
    return norm


def _gemv(fn, x: torch.Tensor, out_features: int, *args) -> torch.Tensor:
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features).float().contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, out_features)
    head = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    threads = torch.get_num_threads() if out_features * in_features >= SERIAL_BELOW else 1
    per = -(-out_features // threads)
    _parallel([(fn, *head, in_features, x2.data_ptr(), rows, o, min(out_features, o + per), y.data_ptr(), out_features)
               for o in range(0, out_features, per)])  # fmt: skip
    return y.view(*x.shape[:-1], out_features)


def _split(fn, out: torch.Tensor, unit: int, *args) -> None:
    """fn(*pointers, start, stop, out + start) over runs of whole units, one per thread; the tensors stay
    referenced here until every thread is done with them."""
    n = out.numel()
    # written behind autograd's back: count it as an in-place change, so that a tensor saved for backward
    # and then overwritten still raises autograd's version error (workspace.attached relies on it)
    torch.autograd.graph.increment_version(out)
    pointers = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    threads = torch.get_num_threads() if n >= SERIAL_BELOW else 1
    units = -(-n // unit)
    per = -(-units // threads) * unit
    size, base = out.element_size(), out.data_ptr()
    _parallel([(fn, *pointers, a, min(n, a + per), base + a * size) for a in range(0, n, per)])


def _parallel(calls: list[tuple]) -> None:
    """Each (fn, *args) on a thread of the pool (one call: in this thread); returns when all are done."""
    if len(calls) == 1:
        calls[0][0](*calls[0][1:])
        return
    for f in [_pool(len(calls)).submit(*call) for call in calls]:
        f.result()


@cache
def _pool_of(threads: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="loraq-dequantize")


def _pool(threads: int) -> ThreadPoolExecutor:
    return _pool_of(threads, os.getpid())  # (a forked child makes its own: threads do not survive a fork)
