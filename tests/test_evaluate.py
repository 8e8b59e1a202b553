import math

import pytest
import torch

from loraq import LoraqError
from loraq.product.evaluate import perplexity, read_text_files


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


def test_rouge_l_known_values():
    from loraq.product.evaluate import rouge_l

    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("the cat", "the big cat") == pytest.approx(2 * (1.0 * 2 / 3) / (1.0 + 2 / 3))
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "c d") == 0.0


SENTENCE = "the small red cat sat on the warm mat today"


def test_generation_scores_use_every_reference(tiny, monkeypatch):
    import sys

    from loraq.product.data import Example
    from loraq.product.evaluate import generation_scores

    model, tok = tiny
    monkeypatch.setattr(sys.modules["loraq.product.evaluate"], "generate", lambda m, t, p, max_new_tokens: SENTENCE)
    examples = [Example("p1", SENTENCE, "g1"), Example("p1", "a blue dog", "g1"), Example("p2", "no match", "g2")]
    scores = generation_scores(model, tok, examples)
    assert len(scores.samples) == 2 and scores.samples[0]["references"] == [SENTENCE, "a blue dog"]
    assert scores.rouge_l == pytest.approx(0.5)  # 1.0 for p1 (its first reference), 0.0 for p2
    assert 30 < scores.bleu < 100
