"""The typed run folder: config.json read back as a TrainConfig, what the data came to, and the GPTQ
calibration examples recorded so that merge and eval rebuild the very base training used."""

import json

import pytest
import torch
from conftest import E2E_TINY
from test_train import config as train_config

import loraq
from loraq import LoraqError, TrainConfig
from loraq.core.inject import lora_layers
from loraq.product.base import rebuild_base
from loraq.product.run_folder import RunFolder, resolve_run


def test_config_round_trips_as_a_typed_config(tmp_path):
    config = TrainConfig(method="qalora", bits=3, quantizer="gptq", lr=3e-4, targets=["q_proj"], out=str(tmp_path))
    run = RunFolder(tmp_path)
    run.write_config(config)
    assert run.read_config() == config
    assert run.read_config().lora.resolved_quantizer == "gptq"


@pytest.mark.parametrize("method, quantizer, pooling", [("qlora", "nf4", "sum"), ("qalora", "rtn", "mean")])
def test_older_run_configs_still_read(tmp_path, method, quantizer, pooling):
    old = TrainConfig(method=method, out=str(tmp_path)).to_dict()
    old["quantizer"] = "rtn"  # what runs before the scheme registry saved for every method
    del old["pooling"], old["train_constants"]  # and QA-LoRA mean-pooled
    (tmp_path / "config.json").write_text(json.dumps(old))
    lora = RunFolder(tmp_path).read_config().lora
    assert (lora.resolved_quantizer, lora.pooling) == (quantizer, pooling)


def test_a_bad_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "x", "lerning_rate": 1}))
    with pytest.raises(LoraqError, match=r"config.json: unknown options \['lerning_rate'\]"):
        RunFolder(tmp_path).read_config()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoraqError, match="config.json: cannot read the run's config"):
        RunFolder(tmp_path).read_config()
    with pytest.raises(LoraqError, match="neither a run folder"):
        resolve_run(tmp_path)


def test_gptq_base_is_rebuilt_from_the_recorded_calibration(tmp_path, tiny_model_dir):
    """With --val-data and --too-long drop the training examples differ from a plain split of --data; a
    merge or eval must calibrate on what training did, or it rebuilds another base."""
    examples = json.loads(E2E_TINY.read_text())["examples"]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": e["input"], "completion": e["target"]}) + "\n" for e in examples[:8]))
    cfg = train_config(
        tmp_path, tiny_model_dir, method="qalora", quantizer="gptq", val_data=str(val), too_long="drop",
        max_length=55, steps=3, eval_every=0,
    )  # fmt: skip
    result = loraq.train(cfg, progress=False)
    run = RunFolder(result.out)
    record = run.read_data()
    assert record.dropped > 0 and record.calibration_examples == record.train_examples > 0
    assert len(run.read_calibration()) == record.calibration_examples
    rebuilt, _ = rebuild_base(run, cfg.model, result.tokenizer)
    for name, layer in lora_layers(result.model).items():
        again = rebuilt.get_submodule(name)
        assert torch.equal(layer.base.packed, again.packed) and torch.equal(layer.base.offset, again.offset), name
    report = loraq.evaluate_run(result.out)
    assert report.val_loss == pytest.approx(result.val_loss_after, rel=1e-5)
