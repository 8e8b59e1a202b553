import json

import pytest
from conftest import E2E_TINY, FIXTURES

from loraq import LoraqError
from loraq.data import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    Example,
    collate,
    encode,
    format_prompt,
    load_examples,
    shuffled_batches,
    split_by_group,
)


def test_e2e_fixture_loads_with_instruction():
    examples = load_examples(E2E_TINY)
    assert len(examples) == 72
    assert examples[0].prompt.startswith("Write a one-sentence restaurant description from these attributes: name:")
    assert examples[0].group in examples[0].prompt


def test_split_is_by_group_and_deterministic():
    examples = load_examples(E2E_TINY)
    a = split_by_group(examples, 0.2, 0.2)
    b = split_by_group(list(reversed(examples)), 0.2, 0.2)
    groups = [{e.group for e in part} for part in (a.train, a.val, a.test)]
    assert groups[0] and groups[1] and groups[2]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert {e.group for e in b.test} == groups[2]
    assert len(a.train) + len(a.val) + len(a.test) == len(examples)


def test_jsonl_loads_and_skips_blank_lines():
    examples = load_examples(FIXTURES / "pairs.jsonl")
    assert [e.response for e in examples] == ["Hello!", "Blue.", "One, two, three."]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "completion": "b"}\n\n["x"]\n', r"bad\.jsonl:3: expected a JSON object"),
        ('{"prompt": "a", "answer": "b"}\n', r"bad\.jsonl:1: missing string field 'completion'"),
        ("\n\n", r"bad\.jsonl holds no examples"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LoraqError, match=message):
        load_examples(path)


def test_bad_encoding_and_missing_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(LoraqError, match="not UTF-8"):
        load_examples(path)
    with pytest.raises(LoraqError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "t.json").write_text(json.dumps({"examples": [{"input": "x"}]}))
    with pytest.raises(LoraqError, match="example 0 needs string fields"):
        load_examples(tmp_path / "t.json")


def test_encode_masks_prompt_and_ends_with_eos(tiny):
    _, tok = tiny
    ex = Example("Say hi.", "Hi there.", "g")
    item = encode(tok, ex, 256)
    prompt_len = len(tok(format_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"])
    assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert item["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(item["input_ids"][prompt_len:-1]) == "Hi there."
    assert "<|im_start|>assistant\n" in tok.decode(item["input_ids"][:prompt_len])


def test_encode_truncates_and_drops(tiny):
    _, tok = tiny
    ex = Example("Say hi.", "word " * 100, "g")
    assert len(encode(tok, ex, 40)["input_ids"]) == 40
    assert encode(tok, ex, 5) is None


def test_fallback_template_without_chat_template(tiny):
    _, tok = tiny
    tok.chat_template = None
    assert format_prompt(tok, "Q?") == FALLBACK_TEMPLATE.format(prompt="Q?")


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_shuffled_batches_are_seeded_and_cover_each_epoch():
    items = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    first = [b["input_ids"].flatten().tolist() for _, b in zip(range(4), shuffled_batches(items, 3, 0, seed=1))]
    again = [b["input_ids"].flatten().tolist() for _, b in zip(range(4), shuffled_batches(items, 3, 0, seed=1))]
    assert first == again
    assert sorted(sum(first, [])) == list(range(10))  # 3+3+3+1: one full epoch
