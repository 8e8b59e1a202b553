import json

import pytest

from loraq import LoraqError, TrainConfig
from loraq.product.cli import build_parser
from loraq.product.train_config import BEST_LR


@pytest.mark.parametrize(
    "options, key",
    [
        ({}, "lora"),
        ({"method": "qlora"}, "qlora"),
        ({"method": "qalora"}, "qalora"),
        ({"method": "qalora", "train_constants": "both"}, "qalora"),  # rank 16 and constants: the adapter's rate
        ({"method": "qalora", "rank": 0, "train_constants": "both"}, "qalora, constants only"),
        ({"method": "qalora", "rank": 0, "train_constants": "offset"}, "qalora, constants only"),
    ],
)
def test_learning_rate_defaults_to_the_methods_best(options, key):
    assert TrainConfig(**options).lr == BEST_LR[key]


@pytest.mark.parametrize("rank, want", [(4, 4e-3), (1, 8e-3), (16, 2e-3), (64, 2e-3)])
def test_a_low_rank_gets_a_larger_default_rate(rank, want):
    """bench/qalora.py at r=4: every setup best at 4e-3-8e-3, against 2e-3 at r=16 (README, "DoRA vs LoRA")."""
    assert TrainConfig(method="qalora", rank=rank).lr == pytest.approx(want)
    assert TrainConfig(method="lora", rank=rank, lr=1e-3).lr == 1e-3  # a given rate is never scaled


def test_a_given_learning_rate_wins_and_is_recorded():
    config = TrainConfig(method="qalora", rank=0, train_constants="both", lr=3e-3)
    assert config.lr == 3e-3
    # the run folder records the rate actually used, so a resumed or re-read run trains at the same rate
    assert json.loads(json.dumps(config.to_dict()))["lr"] == 3e-3
    assert TrainConfig(**TrainConfig(method="qlora").to_dict()).lr == BEST_LR["qlora"]


def test_cli_learning_rate_is_a_number():
    args = build_parser().parse_args(["train", "--lr", "5e-4"])
    assert args.lr == 5e-4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lr", "fast"])


def test_bad_learning_rate_is_named():
    with pytest.raises(LoraqError, match="--lr must be a positive number"):
        TrainConfig(lr=-1.0)


def test_example_configs_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        config = TrainConfig.from_yaml(path)
        assert config.steps == 150 and config.lr > 0, path
