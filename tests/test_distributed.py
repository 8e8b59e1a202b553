"""Two CPU processes under torchrun (gloo), the model sharded with FSDP2, compute the one-process run with the
same global batch: for every method, with resumes across process counts and after a killed rank, and with
bounded exits when a rank dies or fails. Each run is a real `torchrun --nproc-per-node 2` with a timeout, so a
hang fails the test instead of stalling the suite (tests/fsdp_worker.py is what each process runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import E2E_TINY, FIXTURES
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fsdp_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
# fp32: the processes sum in another order than one process does; bf16 autocast's rounding would hide the
# 1e-6 agreement these tests check (a CPU with native bf16 otherwise trains in bf16)
OPTIONS = {"steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2, "lr": 2e-3, "compute_dtype": "fp32"}
METHODS = ["lora", "qlora", "qalora", "constants", "gguf", "gptq", "qlora-untied", "saved-nf4", "saved-int4", "dora",
           "qdora", "qadora"]  # fmt: skip


def launch(args: list[str], processes: int, timeout: float = 240) -> subprocess.CompletedProcess:
    head = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable]
    return subprocess.run([*head, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def failure(done: subprocess.CompletedProcess) -> str:
    """What to show of a failed run: every process's own error lines, then the end of the output."""
    own = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line or "abort" in line.lower()]
    return "\n".join(own[:40]) + "\n...\n" + done.stderr[-3000:]


def worker_run(out: Path, method: str, processes: int, **options) -> Path:
    done = launch([str(WORKER), "train", str(out), method, json.dumps({**OPTIONS, **options})], processes)
    (out / "stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, failure(done)
    return out


# LoRA validates on 3 examples one at a time: the processes get 2 and 1, and the one with fewer batches must
# still join every forward pass (a sharded model gathers each block from all of them). Group constants train
# with two micro-batches a step (the gradients reduced once, after the second).
PER_METHOD = {
    "lora": {"val_data": str(FIXTURES / "e2e_val3.json"), "eval_batch_size": 1},
    "constants": {"batch_size": 2, "grad_accum": 2},
    "dora": {"dora": True},  # the magnitudes start from the base's rows once they are loaded into the shards
    "qdora": {"dora": True},
    "qadora": {"dora": True},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(method, processes) -> the folder of that run, each run once for the whole module."""
    made: dict[tuple[str, int], Path] = {}

    def get(method: str, processes: int) -> Path:
        if (method, processes) not in made:
            options = PER_METHOD.get(method, {})
            folder = tmp_path_factory.mktemp(f"{method}-{processes}")
            made[method, processes] = worker_run(folder, method, processes, **options)
        return made[method, processes]

    return get


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r[k] for r in metrics(run) for k in ("loss", "val_loss") if k in r]


def trained(run: Path) -> dict[str, torch.Tensor]:
    folder = run / "adapter"
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_run(a: Path, b: Path, rel: float = 1e-6, adapters: bool = True) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 1 + OPTIONS["steps"] + OPTIONS["steps"] // OPTIONS["eval_every"]
    for x, y in zip(la, lb):
        assert abs(x - y) <= rel * abs(x), (la, lb)  # per-step training and validation losses
    ta, tb = trained(a), trained(b)
    assert set(ta) == set(tb) and ta
    # Adam makes a step of about lr from a gradient near 0 whatever its last bits: compare to lr
    for k in ta if adapters else ():
        assert float((ta[k] - tb[k]).abs().max()) <= 1e-2 * OPTIONS["lr"], k
        assert float((ta[k] - tb[k]).norm()) <= 1e-4 * float(ta[k].norm()), k


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_what_one_does_holding_half_the_base_each(runs, method):
    one, two = runs(method, 1), runs(method, 2)
    assert_same_run(one / "run", two / "run")
    # the quantized base gathered from the two shards is byte for byte the one-process base
    base_one, base_two = load_file(one / "base.safetensors"), load_file(two / "base.safetensors")
    assert set(base_one) == set(base_two)
    assert all(torch.equal(base_one[k], base_two[k]) for k in base_one)
    # each process holds half of every quantized tensor, to within one row
    shares = [json.loads((two / f"storage-rank{r}.json").read_text()) for r in (0, 1)]
    assert set(shares[0]) == set(base_one) or method == "lora"
    for name, (local, total, row) in shares[0].items():
        other = shares[1][name][0]
        assert local + other == total, name
        assert abs(local - total / 2) <= row, (name, local, total, row)
    whole = sum(v[1] for v in shares[0].values())
    if method != "lora":
        assert sum(v[0] for v in shares[0].values()) <= 0.55 * whole


def test_a_run_saved_by_two_processes_resumes_in_one_and_the_reverse(runs, tmp_path):
    for saved_by, resumed_in in ((2, 1), (1, 2)):
        source = runs("qalora", saved_by)
        copy = tmp_path / f"{saved_by}-to-{resumed_in}"
        shutil.copytree(source / "run", copy / "run")
        shutil.rmtree(copy / "run" / "checkpoints" / "step-000004")  # resume from step 2
        worker_run(copy, "qalora", resumed_in, resume=True, model=str(source / "hf"))
        assert_same_run(source / "run", copy / "run")


def test_a_killed_rank_stops_the_run_in_bounded_time_and_resume_is_bit_identical(runs, tmp_path, tiny_model_dir):
    args = ["train", "--model", str(tiny_model_dir), "--data", str(E2E_TINY), "--method", "qlora", "--rank", "4"]
    args += ["--steps", "4", "--batch-size", "4", "--save-every", "2", "--eval-every", "2", "--device", "cpu"]
    args += ["--lr", "1e-2", "--warmup-steps", "1", "--out", str(tmp_path / "run")]
    start = time.monotonic()
    killed = launch([str(WORKER), "cli", "kill", "3", *args], 2, timeout=180)
    assert killed.returncode != 0
    assert time.monotonic() - start < 120
    assert "local_rank: 1" in killed.stderr and "Signal 9" in killed.stderr, killed.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainer.json").is_file()
    assert not (tmp_path / "run" / "adapter").exists()

    resumed = launch([str(WORKER), "cli", "none", "0", *args, "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = launch([str(WORKER), "cli", "none", "0", *args[:-1], str(tmp_path / "whole")], 2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")  # bit for bit
    a, b = trained(tmp_path / "run"), trained(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_rank_ends_the_run_with_one_message_naming_it(tmp_path, tiny_model_dir):
    args = ["train", "--model", str(tiny_model_dir), "--data", str(E2E_TINY), "--rank", "4", "--steps", "4"]
    args += ["--batch-size", "4", "--eval-every", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    start = time.monotonic()
    failed = launch([str(WORKER), "cli", "raise", "2", *args], 2, timeout=180)
    assert failed.returncode != 0 and time.monotonic() - start < 120
    assert failed.stderr.count("loraq: error: rank 1: injected fault after step 2") == 1, failed.stderr[-3000:]


def test_a_batch_the_processes_cannot_split_is_refused_before_any_work(tmp_path, tiny_model_dir):
    args = ["-m", "loraq", "train", "--model", str(tiny_model_dir), "--data", str(E2E_TINY), "--steps", "2"]
    args += ["--batch-size", "3", "--device", "cpu", "--out", str(tmp_path / "run")]
    done = launch(args, 2, timeout=180)
    assert done.returncode != 0
    assert "--batch-size 3 does not split over 2 processes" in done.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_cpu_offload_without_torchrun_is_refused(tmp_path, tiny_model_dir):
    from loraq import LoraqError, TrainConfig, train

    config = TrainConfig(model=str(tiny_model_dir), data=str(E2E_TINY), steps=1, cpu_offload=True, out=str(tmp_path))
    with pytest.raises(LoraqError, match="--cpu-offload .*torchrun"):
        train(config, progress=False)


def test_merge_and_export_of_a_two_process_run_are_the_one_process_files(runs, tmp_path):
    from safetensors.torch import load_file as read

    from loraq import merge_run

    merged = {}
    for processes in (1, 2):
        out = tmp_path / f"merged-{processes}"
        merge_run(runs("qalora", processes) / "run", out, format="hf", dtype="fp32", prompts=2)
        merged[processes] = read(out / "model.safetensors")
    assert set(merged[1]) == set(merged[2])
    for key, one in merged[1].items():
        two = merged[2][key]
        assert one.shape == two.shape and one.dtype == two.dtype, key
        # the merge rounds each group offset to fp16: adapters equal to ~1e-9 may round a few a step apart
        assert float((one - two).abs().max()) <= 2**-10 * float(one.abs().max()), key  # an fp16 step, at most
        assert float((one != two).float().mean()) < 0.01, key


def test_cpu_offload_on_a_cpu_run_is_refused_naming_the_option(tmp_path, tiny_model_dir):
    args = ["-m", "loraq", "train", "--model", str(tiny_model_dir), "--data", str(E2E_TINY), "--steps", "2"]
    args += ["--batch-size", "4", "--device", "cpu", "--cpu-offload", "--out", str(tmp_path / "run")]
    done = launch(args, 2, timeout=180)
    assert done.returncode != 0
    assert "loraq: error: rank 0: --cpu-offload moves GPU shards to host memory" in done.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nccl cannot put two ranks on one GPU)")
@pytest.mark.parametrize("offload", [False, True])
def test_two_gpus_train_what_one_does(tmp_path, offload):
    cuda = {"device": "cuda", "compute_dtype": "bf16", "cpu_offload": offload}
    one = worker_run(tmp_path / "one", "qlora", 1, **{**cuda, "cpu_offload": False})
    two = worker_run(tmp_path / "two", "qlora", 2, **cuda)
    # bf16 autocast: sums in another order round apart, so losses to 1e-2 and no element-wise adapter check
    assert_same_run(one / "run", two / "run", rel=1e-2, adapters=False)


def test_threads_per_process_share_the_cores_under_torchrun(monkeypatch):
    """torchrun gives each process OMP_NUM_THREADS=1 unless the user set it: loraq shares the machine's cores
    among its processes instead (a CPU run), keeps a user's own OMP_NUM_THREADS, and --threads wins."""
    from loraq.product.distributed import set_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default
        assert "8 threads per process (16 cores / 2 processes" in set_threads(0, "cpu")
        assert torch.get_num_threads() == 8
        assert set_threads(0, "cuda") is None  # a GPU run computes there
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's
        assert set_threads(0, "cpu") is None
        assert set_threads(5, "cpu") == "5 threads per process (--threads)" and torch.get_num_threads() == 5
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads(0, "cpu") is None  # one process: torch's own default
    finally:
        torch.set_num_threads(before)
    from loraq import LoraqError, TrainConfig

    with pytest.raises(LoraqError, match="--threads must be an integer >= 0"):
        TrainConfig(threads=-1)
