"""The process's own memory apart from mapped files (product/host_memory.py), as the run summary reports it."""

import json
import subprocess
import sys

import pytest
from conftest import E2E_TINY

import loraq

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


SCENARIO = """
import json, sys, torch
from loraq.product.host_memory import HostMemory, read_status
before = read_status()
with HostMemory(interval=0.01) as memory:
    memory.phase("tensor")
    t = torch.ones(32 * 2**20 // 4)  # 32 MiB, written
    memory.phase("file")
    mapped = torch.from_file(sys.argv[1], shared=True, size=64 * 2**20, dtype=torch.uint8)
    assert int(mapped.sum()) == 64 * 2**20  # every page read
    memory.phase("done")
found = {"rss": memory.peak("rss"), "anon": memory.peak("anonymous")}
print(json.dumps({"before": before, "peaks": memory.peaks, **found}))
"""


@linux
def test_a_tensor_counts_as_anonymous_and_a_mapped_file_as_file_pages(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\1" * (64 * 2**20))
    # a fresh process: in this one, freed memory the allocator kept could take the tensor without growing
    done = subprocess.run([sys.executable, "-c", SCENARIO, str(path)], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    before, peaks = found["before"], found["peaks"]
    assert peaks["tensor"]["anonymous"] - before["anonymous"] >= 30 * 2**20
    assert peaks["file"]["files"] - before["files"] >= 60 * 2**20
    assert found["rss"] >= found["anon"] + 60 * 2**20 > 0


@linux
def test_the_run_summary_says_what_the_process_itself_needed(tmp_path, tiny_model_dir):
    config = loraq.TrainConfig(model=str(tiny_model_dir), data=str(E2E_TINY), steps=1, batch_size=2,
                               eval_every=0, out=str(tmp_path / "run"))  # fmt: skip
    loraq.train(config, progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["peak_anonymous_mb"] <= summary["peak_rss_mb"]
    assert summary["peak_files_mb"] > 0


def test_mmap_threshold_is_an_explicit_checked_option():
    import platform

    import pytest

    from loraq import LoraqError, TrainConfig
    from loraq.product.host_memory import set_mmap_threshold

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert set_mmap_threshold(4)
        assert set_mmap_threshold(32)  # glibc's own ceiling: what its dynamic threshold reaches anyway
    for bad in (-1, 33, 1.5):
        with pytest.raises(LoraqError, match="--mmap-threshold-mb must be an integer from 0 to 32"):
            TrainConfig(mmap_threshold_mb=bad)
