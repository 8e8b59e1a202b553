import json
import subprocess
import sys

import pytest
from conftest import E2E_TINY, FIXTURES

from loraq.product.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_generate(capsys, tmp_path, tiny_model_dir):
    code, out, _ = run(
        capsys,
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(E2E_TINY),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--targets",
        "q_proj,v_proj",
        "--out",
        str(tmp_path / "run"),
        "--eval-every",
        "0",
    )
    assert code == 0
    assert "validation loss" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(tmp_path / "run" / "adapter"),
        "--prompt",
        "name: The Mill",
        "--max-new-tokens",
        "4",
    )
    assert code == 0 and out.endswith("\n")  # a random tiny model may well say nothing


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--rank", "0"], "--rank"),
        (["--lr", "-0.1"], "--lr"),
        (["--targets", "q_prj"], "did you mean 'q_proj'"),
        (["--data", "missing.jsonl"], "missing.jsonl does not exist"),
        (["--model", "/no/such/model"], "no such model folder"),
    ],
)
def test_train_errors_are_one_line(capsys, tmp_path, tiny_model_dir, argv, needle):
    base = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(E2E_TINY),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "r"),
    ]
    code, _, err = run(capsys, *base, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraq: error:") and needle in lines[0]
    assert not (tmp_path / "r" / "adapter").exists()


def test_bad_data_line_is_named(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((FIXTURES / "pairs.jsonl").read_text() + "{oops\n")
    code, _, err = run(
        capsys, "train", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "r")
    )
    assert code == 2 and "bad.jsonl:5: not valid JSON" in err


def test_generate_with_bad_adapter_is_one_line(capsys, tmp_path, tiny_model_dir):
    code, _, err = run(capsys, "generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path), "--prompt", "x")
    assert code == 2 and "adapter_config.json is missing" in err


def test_module_entry_point_has_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "loraq", "train", "--rank", "0", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "--rank" in done.stderr


def test_train_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--method",
        "--rank",
        "--alpha",
        "--dropout",
        "--targets",
        "--steps",
        "--batch-size",
        "--grad-accum",
        "--lr",
        "--max-length",
        "--eval-every",
        "--out",
    ):
        assert flag in out
    assert "(default: 16)" in out


def test_yaml_config_with_flag_overrides_and_typos(tmp_path, tiny_model_dir, capsys):
    from conftest import E2E_TINY

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata: {E2E_TINY}\nsteps: 3\nbatch-size: 4\nrank: 4\nlr: 1.0e-2\n"
        f"eval_every: 0\nout: {tmp_path / 'run'}\n"
    )
    assert main(["train", "--config", str(cfg), "--steps", "2"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["steps"] == 2 and saved["rank"] == 4 and saved["batch_size"] == 4  # the flag wins
    capsys.readouterr()
    cfg.write_text("model: x\nlearning_rate: 1e-3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown option 'learning_rate'" in capsys.readouterr().err
    cfg.write_text("steps: many\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--steps must be a positive integer, got 'many'" in capsys.readouterr().err


def test_example_configs_are_valid():
    from pathlib import Path

    from loraq import TrainConfig

    folder = Path(__file__).parent.parent / "configs"
    methods = {TrainConfig.from_yaml(path).method for path in folder.glob("*.yaml")}
    assert methods == {"lora", "qlora", "qalora"}


@pytest.mark.parametrize("command", ["train", "generate", "merge", "eval", "compare", "plan", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: loraq " + command in text
    if command == "train":
        import dataclasses

        from loraq import TrainConfig

        for f in dataclasses.fields(TrainConfig):
            if f.init:
                assert "--" + f.name.replace("_", "-") in text
