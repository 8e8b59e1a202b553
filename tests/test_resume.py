"""Checkpoints, resuming, interrupts and a NaN stop (tiny model, CPU: resumed losses are bit-identical)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_train import config as train_config

import loraq
from loraq import LoraqError


def losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def cli(tmp_path, tiny_model_dir, out, *extra):
    args = ["--model", str(tiny_model_dir), "--data", str(train_config(tmp_path, tiny_model_dir).data)]
    args += ["--steps", "60", "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--eval-every", "0"]
    args += ["--save-every", "2", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "loraq", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(path, proc, timeout=60):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.005)


def test_sigkill_then_resume_gives_the_same_losses(tmp_path, tiny_model_dir):
    reference = cli(tmp_path, tiny_model_dir, tmp_path / "ref")
    assert reference.wait() == 0, reference.communicate()
    killed = tmp_path / "killed"
    for kill_after in (4, 18):  # killed twice, resumed twice
        proc = cli(tmp_path, tiny_model_dir, killed, *(["--resume"] if kill_after > 4 else []))
        wait_for(killed / "checkpoints" / f"step-{kill_after:06d}" / "trainer.json", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = cli(tmp_path, tiny_model_dir, killed, "--resume")
    assert proc.wait() == 0, proc.communicate()
    assert losses(killed) == losses(tmp_path / "ref")  # bit-identical, every step
    assert len(losses(killed)) == 60
    a = (killed / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "ref" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    proc = cli(tmp_path, tiny_model_dir, out)
    wait_for(out / "checkpoints" / "step-000002" / "trainer.json", proc)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in stdout
    stopped = max(losses(out))
    assert (out / "checkpoints" / f"step-{stopped:06d}").is_dir() and not (out / "adapter").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import loraq.product.train as _  # noqa: F401

    module = sys.modules["loraq.product.train"]
    real = module.loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += int(model.training)
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if calls["n"] == 5 and model.training else (loss, n)

    monkeypatch.setattr(module, "loss_sum", poisoned)
    cfg = train_config(tmp_path, tiny_model_dir, steps=8, save_every=2, eval_every=0)
    with pytest.raises(LoraqError, match=r"loss became nan at step 5; .*last good checkpoint is .*step-000004"):
        loraq.train(cfg, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_resume_refuses_changed_options_and_finished_runs_need_overwrite(tmp_path, tiny_model_dir):
    loraq.train(train_config(tmp_path, tiny_model_dir, steps=4, save_every=2, eval_every=0), progress=False)
    with pytest.raises(LoraqError, match=r"the options differ .*lr: 0\.01 -> 0\.02"):
        loraq.train(train_config(tmp_path, tiny_model_dir, steps=4, lr=2e-2, resume=True), progress=False)
    with pytest.raises(LoraqError, match="already holds a finished run; pass --overwrite"):
        loraq.train(train_config(tmp_path, tiny_model_dir, steps=4), progress=False)
    result = loraq.train(train_config(tmp_path, tiny_model_dir, steps=3, overwrite=True), progress=False)
    assert max(losses(result.out)) == 3
    with pytest.raises(LoraqError, match="holds no run to resume"):
        loraq.train(train_config(tmp_path / "new", tiny_model_dir, resume=True), progress=False)


def test_schedules_and_report(tmp_path, tiny_model_dir):
    from loraq.product.train import lr_at

    lin = loraq.TrainConfig(steps=10, lr=1.0, warmup_steps=0, schedule="linear")
    const = loraq.TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, lin) for s in (0, 5)] == [1.0, 0.5]
    assert [lr_at(s, const) for s in (0, 1, 2, 9)] == [1 / 3, 2 / 3, 1.0, 1.0]
    result = loraq.train(train_config(tmp_path, tiny_model_dir, steps=4, eval_every=2), progress=False)
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens_seen"] > 0 and summary["best_val_loss"] is not None
    assert (result.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dora_run_killed_and_resumed_gives_the_same_losses(tmp_path, tiny_model_dir):
    """DoRA's magnitudes are checkpointed and restored with the adapter: bit-identical losses after a SIGKILL."""
    extra = ("--method", "qalora", "--dora", "--steps", "12")
    reference = cli(tmp_path, tiny_model_dir, tmp_path / "ref", *extra)
    assert reference.wait() == 0, reference.communicate()
    killed = tmp_path / "killed"
    proc = cli(tmp_path, tiny_model_dir, killed, *extra)
    wait_for(killed / "checkpoints" / "step-000006" / "trainer.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = cli(tmp_path, tiny_model_dir, killed, *extra, "--resume")
    assert proc.wait() == 0, proc.communicate()
    assert losses(killed) == losses(tmp_path / "ref") and len(losses(killed)) == 12
