"""Training data: reading examples, splitting them, turning them into token ids with the loss on the response.

The default task is E2E NLG (restaurant attributes -> a one-sentence description; data CC BY-SA 4.0), taken
from the bigbench sdist on first use. Your own data can be a JSONL file of {"prompt": ..., "completion": ...}.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoraqError
from .fetch import E2E_TASK, fetch

E2E_INSTRUCTION = "Write a one-sentence restaurant description from these attributes: {attributes}"
# Used when a tokenizer has no chat template of its own.
FALLBACK_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    group: str  # examples of one group (an E2E attribute set) always land in the same split


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]


def load_examples(data: str | os.PathLike) -> list[Example]:
    """Read examples from "e2e" (the default task), a bigbench-style task.json, or a prompt/completion JSONL.

    Raises:
        LoraqError: the file is missing or malformed (naming the file and line or example).
    """
    if str(data) == "e2e":
        return load_e2e(fetch(E2E_TASK))
    path = Path(data)
    if not path.is_file():
        raise LoraqError(f"data (--data): {path} does not exist (use 'e2e' for the default task)")
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    if path.suffix == ".json":
        return load_e2e(path)
    raise LoraqError(f"data (--data): {path} must be a .jsonl (prompt/completion) or bigbench .json file")


def load_e2e(path: str | os.PathLike) -> list[Example]:
    """Read a bigbench task.json ({"examples": [{"input": attributes, "target": text}, ...]})."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraqError(f"{path} is not valid UTF-8 JSON: {e}") from None
    items = raw.get("examples") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise LoraqError(f"{path}: expected a JSON object with an 'examples' list")
    examples = []
    for i, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("input"), str)
            or not isinstance(item.get("target"), str)
        ):
            raise LoraqError(f"{path}: example {i} needs string fields 'input' and 'target'")
        attributes = item["input"].strip()
        prompt = E2E_INSTRUCTION.format(attributes=attributes)
        examples.append(Example(prompt, item["target"].strip(), attributes))
    if not examples:
        raise LoraqError(f"{path} holds no examples")
    return examples


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read one {"prompt": str, "completion": str} object per line; blank lines are skipped."""
    path = Path(path)
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LoraqError(
                        f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line"
                    ) from None
                if not isinstance(item, dict):
                    raise LoraqError(f"{path}:{lineno}: expected a JSON object with 'prompt' and 'completion'")
                for key in ("prompt", "completion"):
                    if not isinstance(item.get(key), str):
                        raise LoraqError(f"{path}:{lineno}: missing string field {key!r}")
                examples.append(Example(item["prompt"], item["completion"], item["prompt"]))
    except UnicodeDecodeError as e:
        raise LoraqError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not examples:
        raise LoraqError(f"{path} holds no examples")
    return examples


def split_by_group(examples: list[Example], val_fraction: float = 0.1, test_fraction: float = 0.1) -> Splits:
    """Split deterministically by group, so that no test or validation group is ever seen in training.

    Each group goes to a split by a hash of its key, which does not depend on the order of the file.
    """
    splits = Splits([], [], [])
    for ex in examples:
        u = int.from_bytes(hashlib.sha256(ex.group.encode()).digest()[:8], "big") / 2**64
        target = splits.test if u < test_fraction else splits.val if u < test_fraction + val_fraction else splits.train
        target.append(ex)
    return splits


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the chat template's user turn, or a plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def encode(tokenizer, example: Example, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels for one example; labels are IGNORE_INDEX on the prompt (loss on the response).

    The response is followed by the end-of-sequence token so the model learns to stop. Returns None when
    the prompt alone fills `max_length` (no response token would be left to learn from).
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_all(tokenizer, examples: list[Example], max_length: int) -> tuple[list[dict], int]:
    """Encode every example; return the encoded ones and how many were dropped for length."""
    encoded = [encode(tokenizer, ex, max_length) for ex in examples]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into (B, T) tensors."""
    width = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def shuffled_batches(items: list[dict], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: a fresh seeded shuffle each epoch; a short last batch of an epoch is kept."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            yield collate([items[j] for j in order[i : i + batch_size]], pad_id)


def ordered_batches(items: list[dict], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pass in file order (for evaluation)."""
    for i in range(0, len(items), batch_size):
        yield collate(items[i : i + batch_size], pad_id)
