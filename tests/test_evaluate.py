import math

import pytest
import torch

from loraq import LoraqError
from loraq.evaluate import perplexity, read_text_files


def test_perplexity_is_exp_of_the_mean_window_loss(tiny):
    model, tok = tiny
    text = "the quick brown fox jumps over the lazy dog " * 40
    ids = tok(text, add_special_tokens=False)["input_ids"][:64]
    x = torch.tensor(ids).view(4, 16)
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss for row in x]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert perplexity(model, tok, text, window=16, max_tokens=64, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_text_shorter_than_a_window_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(LoraqError, match="fewer than one window"):
        perplexity(model, tok, "too short", window=512)


def test_text_files_are_read_and_bad_ones_named(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    assert read_text_files([tmp_path / "a.txt", tmp_path / "a.txt"]) == "one\n\none"
    with pytest.raises(LoraqError, match="b.txt: not UTF-8"):
        read_text_files([tmp_path / "b.txt"])
    with pytest.raises(LoraqError, match="does not exist"):
        read_text_files([tmp_path / "c.txt"])
