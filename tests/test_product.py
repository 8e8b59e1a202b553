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


def test_plan_per_process_under_torchrun(tiny_model_dir):
    one = plan_memory(str(tiny_model_dir), "qlora", 4, 64)
    two = plan_memory(str(tiny_model_dir), "qlora", 4, 64, world_size=2)
    assert two.weights == one.weights // 2 and two.adapter == one.adapter // 2
    assert two.activations < one.activations and two.gathered > 0 == one.gathered
    assert two.trainable_params == one.trainable_params  # the adapter in all, not a shard's
    gpu = dict(model=str(tiny_model_dir), method="qlora", batch_size=4, seq_len=64, device="cuda", world_size=2)
    offloaded = plan_memory(**gpu, cpu_offload=True)
    assert offloaded.on_device < plan_memory(**gpu).on_device and offloaded.host > plan_memory(**gpu).host
    for bad, message in [(dict(world_size=3), "--batch-size 4 does not split over 3 processes"),
                         (dict(cpu_offload=True), "--cpu-offload .* --world-size >= 2"),
                         (dict(device="tpu"), "--device must be cpu or cuda")]:  # fmt: skip
        with pytest.raises(LoraqError, match=message):
            plan_memory(str(tiny_model_dir), "qlora", 4, 64, **bad)


def test_plan_says_how_llama_2_70b_qlora_fits_on_two_24_gib_gpus():
    from loraq.product.plan import offload_advice

    options = dict(model="meta-llama/Llama-2-70b-hf", method="qlora", batch_size=2, seq_len=512, rank=16,
                   grad_checkpoint=True, compute_bytes=2, device="cuda", world_size=2)  # fmt: skip
    plan = plan_memory(**options)
    assert 16 * 2**30 < plan.weights < 18 * 2**30  # 68.4 B linear weights at 4.127 bits, and 16-bit embeddings, / 2
    assert not plan_memory(**{**options, "world_size": 1}).fits(24 * 2**30)
    assert plan_memory(**options, cpu_offload=True).fits(24 * 2**30)
    assert "with --cpu-offload it fits" in offload_advice(options, 20 * 2**30)


def test_plan_counts_what_apply_trains(tiny_model_dir, tiny):
    import loraq

    model, _ = tiny
    config = loraq.LoraConfig(r=0, method="qalora", train_constants="both")
    loraq.apply(model, config)
    plan = plan_memory(str(tiny_model_dir), "qalora", 4, 64, rank=0, train_constants="both")
    assert plan.trainable_params == loraq.parameter_summary(model).trainable


def test_plan_counts_a_16bit_files_embeddings_as_loaded(tmp_path, tiny_model_dir):
    """A quantized load keeps a 16-bit file's embedding and head in 16 bits (checkpoint.py); the plan counts them
    so, and on a CPU counts the fp32 weights of an fp32 file (the tiny model's) at 4 bytes."""
    import json
    import shutil

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    vocab, hidden = config["vocab_size"], config["hidden_size"]  # tied: one embedding matrix
    fp32, sixteen = (plan_memory(str(f), "qlora", 4, 64).weights for f in (tiny_model_dir, folder))
    assert fp32 - sixteen == 2 * vocab * hidden
    assert plan_memory(str(folder), "lora", 4, 64).weights == plan_memory(str(tiny_model_dir), "lora", 4, 64).weights
