import json

import pytest
from conftest import E2E_TINY, FIXTURES

from loraq import LoraqError
from loraq.product.data import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    Example,
    collate,
    encode,
    encode_all,
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
        ('{"prompt": "a", "completion": "b"}\n\n["x"]\n', r"bad\.jsonl:3: expected an object with fields"),
        (
            '{"prompt": "a", "answer": "b"}\n',
            r"bad\.jsonl:1: cannot tell the format from fields \['answer', 'prompt'\]",
        ),
        ('{"instruction": "a", "output": 3}\n', r"bad\.jsonl:1: field 'output' must be a string, not int \(the alpaca"),
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
    item, truncated = encode(tok, ex, 256)
    assert not truncated
    prompt_len = len(tok(format_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"])
    assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert item["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(item["input_ids"][prompt_len:-1]) == "Hi there."
    assert "<|im_start|>assistant\n" in tok.decode(item["input_ids"][:prompt_len])


def test_encode_truncates_and_drops(tiny):
    _, tok = tiny
    ex = Example("Say hi.", "word " * 100, "g")
    item, truncated = encode(tok, ex, 40)
    assert len(item["input_ids"]) == 40 and truncated
    assert encode(tok, ex, 40, drop_long=True) == (None, False)
    assert encode(tok, ex, 5) == (None, False)
    kept, stats = encode_all(tok, [ex, Example("Say hi.", "Hi.", "g")], 40)
    assert len(kept) == 2 and stats.truncated == 1 and stats.dropped == 0
    kept, stats = encode_all(tok, [ex, Example("Say hi.", "Hi.", "g")], 40, drop_long=True)
    assert len(kept) == 1 and stats.dropped == 1


def test_train_on_prompt_and_plain_text_put_the_loss_everywhere(tiny):
    _, tok = tiny
    item, _ = encode(tok, Example("Say hi.", "Hi there.", "g"), 256, train_on_prompt=True)
    assert item["labels"] == item["input_ids"]
    item, _ = encode(tok, Example("", "Plain text to continue.", "g", raw=True), 256)
    assert item["labels"] == item["input_ids"] and "<|im_start|>" not in tok.decode(item["input_ids"])


RECORDS = [
    ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "Add.\n\n2 and 3", "5"),
    ({"instruction": "Greet.", "output": "Hi"}, "Greet.", "Hi"),
    ({"prompt": "P", "completion": "C"}, "P", "C"),
    ({"input": "I", "target": "T"}, "I", "T"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_formats_are_detected_in_every_file_type(tmp_path, suffix):
    import csv

    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r, _, _ in RECORDS))
        rows = RECORDS
    elif suffix == ".json":
        path.write_text(json.dumps([r for r, _, _ in RECORDS]))
        rows = RECORDS
    else:  # a CSV file has one set of columns: one format per file
        rows = RECORDS[:2]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            writer.writeheader()
            for r, _, _ in rows:
                writer.writerow(r)
    examples = load_examples(path)
    assert [(e.prompt, e.response) for e in examples] == [(p, c) for _, p, c in rows]


def test_chat_and_text_formats(tmp_path, tiny):
    _, tok = tiny
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    ex = load_examples(tmp_path / "chat.jsonl")[0]
    assert ex.context == (("system", "Be brief."), ("user", "Hi?")) and ex.response == "Hello."
    item, _ = encode(tok, ex, 256)
    assert "Be brief." in tok.decode(item["input_ids"])
    (tmp_path / "notes.txt").write_text("First document.\n\nSecond one.\n")
    docs = load_examples(tmp_path / "notes.txt")
    assert [d.response for d in docs] == ["First document.", "Second one."] and all(d.raw for d in docs)
    bad = {"messages": [{"role": "user", "content": "Hi?"}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(LoraqError, match=r"bad\.jsonl:1: the last message must be the assistant's reply"):
        load_examples(tmp_path / "bad.jsonl")
    with pytest.raises(LoraqError, match="--data-format must be one of"):
        load_examples(tmp_path / "chat.jsonl", format="sharegpt")
    with pytest.raises(LoraqError, match="field 'instruction' is missing"):
        load_examples(tmp_path / "chat.jsonl", format="alpaca")


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


def test_packed_examples_do_not_see_each_other(tiny):
    import torch

    from loraq.product.data import pack
    from loraq.product.train import loss_sum

    model, tok = tiny
    items, _ = encode_all(tok, [Example("Say hi.", "Hi there.", "a"), Example("Count.", "One two three.", "b")], 64)
    packed = pack(items, 64)
    assert len(packed) == 1 and packed[0]["position_ids"].count(0) == 2
    batch = collate(packed, tok.pad_token_id)
    separate = sum(loss_sum(model, collate([it], tok.pad_token_id))[0] for it in items)
    together, n = loss_sum(model, batch)
    assert n == sum(int((torch.tensor(it["labels"][1:]) != IGNORE_INDEX).sum()) for it in items)
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)


def test_hub_datasets_need_the_datasets_package(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(LoraqError, match="hf:owner/set: Hugging Face datasets need `pip install datasets`"):
        load_examples("hf:owner/set")
