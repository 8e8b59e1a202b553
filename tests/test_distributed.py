"""Two CPU processes under torchrun (gloo) compute the single-process run with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import E2E_TINY


def test_two_processes_match_one(tmp_path, tiny_model_dir):
    args = ["train", "--model", str(tiny_model_dir), "--data", str(E2E_TINY), "--steps", "5", "--batch-size", "6"]
    args += ["--lr", "1e-2", "--rank", "4", "--eval-every", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "loraq", *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "loraq", *args, "--out", str(tmp_path / "two")]
    double = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 5
    diff = max(abs(a - b) for a, b in zip(one, two))
    print(f"two processes vs one: max per-step loss difference {diff:.2e}")
    assert diff < 1e-4
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
