import pytest

from loraq import LoraConfig, LoraqError


def test_defaults_and_scaling():
    c = LoraConfig(r=16, alpha=32)
    assert c.scaling == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(8.0)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"r": 0}, "r (--rank)"),
        ({"r": 2.5}, "r (--rank)"),
        ({"alpha": -1}, "alpha (--alpha)"),
        ({"dropout": 1.0}, "dropout (--dropout)"),
        ({"init": "zeros"}, "init"),
        ({"method": "dora"}, "method (--method)"),
        ({"targets": []}, "targets (--targets)"),
        ({"targets": "q_proj("}, "targets (--targets)"),
        ({"adapter_name": "a b"}, "adapter_name"),
    ],
)
def test_bad_option_names_the_option(kwargs, names):
    with pytest.raises(LoraqError, match=__import__("re").escape(names)):
        LoraConfig(**kwargs)


def test_all_problems_reported_at_once():
    with pytest.raises(LoraqError) as e:
        LoraConfig(r=0, alpha=0)
    assert "r (--rank)" in str(e.value) and "alpha (--alpha)" in str(e.value)
