import json

import pytest
import torch
from test_train import config as train_config
from transformers import AutoModelForCausalLM

import loraq
from loraq import LoraqError
from loraq.product.cli import main
from loraq.product.export import merge_run
from loraq.quant.frozen import NF4Linear


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("qlora")
    result = loraq.train(train_config(tmp, tiny_model_dir, method="qlora", steps=6, eval_every=0), progress=False)
    return result


def test_merged_qlora_folder_loads_in_transformers_and_matches(qlora_run, tmp_path, tokens):
    report = merge_run(qlora_run.out, tmp_path / "merged", dtype="fp32")
    assert report.error < 1e-4 and report.exact_error is None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, qlora_run.model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_bf16_merge_reports_its_rounding(qlora_run, tmp_path):
    report = merge_run(qlora_run.out, tmp_path / "merged", dtype="bf16")
    assert 0 < report.error < 0.05
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" or config.get("torch_dtype") == "bfloat16"


def test_requantized_merge_is_lossy_and_says_by_how_much(qlora_run, tmp_path, tokens):
    exact = merge_run(qlora_run.out, tmp_path / "m", dtype="fp32").error
    report = merge_run(qlora_run.out, tmp_path / "q", requantize="nf4")
    assert report.error > 10 * exact
    model, _ = loraq.load_model(tmp_path / "q")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    with torch.no_grad():
        delta = (model(tokens).logits - qlora_run.model(tokens).logits).abs().mean()
    assert 0 < float(delta) < 10 * report.error


def test_cli_merge_and_its_errors(qlora_run, tmp_path, capsys):
    assert main(["merge", str(qlora_run.out), "--out", str(tmp_path / "m"), "--requantize", "nf4"]) == 0
    assert "re-quantized to nf4" in capsys.readouterr().out
    assert main(["merge", str(qlora_run.out), "--out", str(tmp_path / "x"), "--requantize", "int5"]) == 2
    assert "--requantize must be one of nf4, fp4, int2" in capsys.readouterr().err
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bare_adapter_needs_a_known_base(qlora_run, tmp_path):
    with pytest.raises(LoraqError, match="could not load model|no such model"):
        merge_run(qlora_run.out / "adapter", tmp_path / "m", model=str(tmp_path / "nope"))
