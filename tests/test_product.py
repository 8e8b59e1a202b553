"""loraq eval, compare and plan on tiny runs."""

import json

import pytest
from test_train import config as train_config

import loraq
from loraq import LoraqError
from loraq.product.cli import main
from loraq.product.plan import plan_memory


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("runs")
    a = loraq.train(train_config(tmp / "a", tiny_model_dir, steps=4, eval_every=2), progress=False)
    b = loraq.train(train_config(tmp / "b", tiny_model_dir, steps=4, method="qlora", eval_every=2), progress=False)
    return a, b


def test_eval_reproduces_the_runs_validation_loss(two_runs, tmp_path, capsys):
    a, _ = two_runs
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log " * 30)
    out = tmp_path / "report.json"
    args = ["eval", str(a.out), "--text", str(text), "--max-tokens", "128", "--generate", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["val_loss"] == pytest.approx(a.val_loss_after, rel=1e-5)
    assert report["text_perplexity"] > 1 and report["bleu"] is not None and len(report["samples"]) == 2
    assert "validation loss" in capsys.readouterr().out


def test_compare_prints_one_table_and_a_chart(two_runs, tmp_path, capsys):
    a, b = two_runs
    chart = tmp_path / "c.png"
    assert main(["compare", str(a.out), str(b.out), "--chart", str(chart)]) == 0
    table = capsys.readouterr().out
    assert "qlora" in table and "best val loss" in table
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


def test_plan_responds_to_method_and_checkpointing(tiny_model_dir):
    lora = plan_memory(str(tiny_model_dir), "lora", 4, 64)
    qlora = plan_memory(str(tiny_model_dir), "qlora", 4, 64)
    qalora = plan_memory(str(tiny_model_dir), "qalora", 4, 64)
    checkpointed = plan_memory(str(tiny_model_dir), "lora", 4, 64, grad_checkpoint=True)
    assert qlora.weights < lora.weights and qalora.trainable_params < lora.trainable_params
    assert checkpointed.activations < lora.activations and lora.peak > lora.weights
    with pytest.raises(LoraqError, match="--method must be"):
        plan_memory(str(tiny_model_dir), "dora")


def test_plan_counts_what_apply_trains(tiny_model_dir, tiny):
    import loraq

    model, _ = tiny
    config = loraq.LoraConfig(r=0, method="qalora", train_constants="both")
    loraq.apply(model, config)
    plan = plan_memory(str(tiny_model_dir), "qalora", 4, 64, rank=0, train_constants="both")
    assert plan.trainable_params == loraq.parameter_summary(model).trainable
