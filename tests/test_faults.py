"""Faults during a run: a full disk while a checkpoint is written, running out of memory, and where a run
writes. (SIGKILL and Ctrl-C are in test_resume.py.)"""

import errno
import sys

import pytest
from test_train import config as train_config

import loraq
from loraq import LoraqError
from loraq.product.resume import latest_checkpoint, load_checkpoint


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    resume = sys.modules["loraq.product.resume"]
    real = resume.save_file
    calls = {"n": 0}

    def filling_up(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (two files) fits; the second does not
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume, "save_file", filling_up)
    cfg = train_config(tmp_path, tiny_model_dir, steps=6, save_every=2, eval_every=0)
    with pytest.raises(
        LoraqError, match=r"checkpoint of step 4 \(No space left on device\); the previous .*step-000002 is intact"
    ):
        loraq.train(cfg, progress=False)
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step-000002"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # no half-written folder
    model, _ = loraq.load_model(tiny_model_dir)
    loraq.apply(model, cfg.lora)
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert load_checkpoint(latest_checkpoint(run), model, optimizer) == 2
    assert not (run / "adapter").exists()


def test_out_of_memory_says_what_to_do(tmp_path, tiny_model_dir, monkeypatch):
    module = sys.modules["loraq.product.train"]

    def no_memory(model, batch):
        if model.training:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return module.__dict__["_real_loss_sum"](model, batch)

    monkeypatch.setitem(module.__dict__, "_real_loss_sum", module.loss_sum)
    monkeypatch.setattr(module, "loss_sum", no_memory)
    with pytest.raises(LoraqError, match=r"out of memory at step 1 .*loraq plan.*--grad-checkpoint"):
        loraq.train(train_config(tmp_path, tiny_model_dir, steps=2, eval_every=0), progress=False)


def test_a_run_writes_only_its_folder(tmp_path, tiny_model_dir, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))
    loraq.train(train_config(work, tiny_model_dir, steps=2, eval_every=0), progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["run"]
    assert not (tmp_path / "cache").exists()  # a local model and data need no cache
    names = {p.name for p in (work / "run").iterdir()}
    assert names == {
        "adapter",
        "checkpoints",
        "config.json",
        "data.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "tensorboard",
    }
