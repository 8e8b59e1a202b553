"""Training data: reading examples, splitting them, turning them into token ids with the loss on the response.

The default task is E2E NLG (restaurant attributes -> a one-sentence description; data CC BY-SA 4.0), taken
from the bigbench sdist on first use. Your own data can be JSONL, JSON, CSV, Parquet or plain text, in the
alpaca, chat, prompt/completion or text format (see `load_examples`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraqError
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
    context: tuple[tuple[str, str], ...] | None = None  # chat: the (role, content) turns before the reply
    raw: bool = False  # plain text for continued pre-training: no template, the loss on every token


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]


FORMATS = ("auto", "alpaca", "chat", "prompt-completion", "text", "bigbench")
_FIELDS = {
    "alpaca": "instruction, input (optional), output",
    "chat": "messages: a list of {role, content} ending with an assistant turn",
    "prompt-completion": "prompt, completion",
    "text": "text",
    "bigbench": "input, target",
}


def load_examples(data: str | os.PathLike, format: str = "auto") -> list[Example]:
    """Read examples from "e2e" (the default task), a Hugging Face dataset ("hf:owner/name[:split]", needs
    the datasets package and network), or a file: .jsonl, .json (a list of records, or a bigbench task with
    an "examples" list), .csv, .parquet (needs pyarrow) or .txt (plain text, one document per
    blank-line-separated block).

    Record formats, detected from the fields or named with `format`: alpaca (instruction, input, output),
    chat (messages), prompt-completion (prompt, completion), text (text), bigbench (input, target).

    Raises:
        LoraqError: the file is missing, empty or malformed (naming the file and line or record, and the
            fields the format expects).
    """
    if format not in FORMATS:
        raise LoraqError(f"--data-format must be one of {', '.join(FORMATS)}, got {format!r}")
    if str(data) == "e2e":
        return load_e2e(fetch(E2E_TASK))
    if str(data).startswith("hf:"):
        return [_example(where, record, format) for where, record in _read_hub_dataset(str(data)[3:])]
    path = Path(data)
    if not path.is_file():
        raise LoraqError(f"data (--data): {path} does not exist (use 'e2e' for the default task)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        raw = _read_json(path)
        if isinstance(raw, dict) and "examples" in raw:
            return load_e2e(path)
        if not isinstance(raw, list):
            raise LoraqError(f"{path}: expected a JSON list of records (or a bigbench object with 'examples')")
        records = [(f"{path}: record {i}", r) for i, r in enumerate(raw)]
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    elif suffix == ".txt":
        text = _read_text(path)
        blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
        records = [(f"{path}: block {i}", {"text": b}) for i, b in enumerate(blocks)]
    else:
        raise LoraqError(f"data (--data): {path} must be .jsonl, .json, .csv, .parquet or .txt")
    if not records:
        raise LoraqError(f"{path} holds no examples")
    return [_example(where, record, format) for where, record in records]


def _example(where: str, record, format: str) -> Example:
    if not isinstance(record, dict):
        raise LoraqError(f"{where}: expected an object with fields, got {type(record).__name__}")
    kind = format if format != "auto" else _detect(record)
    if kind is None:
        known = "; ".join(f"{k}: {v}" for k, v in _FIELDS.items())
        raise LoraqError(f"{where}: cannot tell the format from fields {sorted(record)}; expected one of ({known})")

    def field(name: str, optional: bool = False) -> str:
        value = record.get(name)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            problem = "is missing" if value is None else f"must be a string, not {type(value).__name__}"
            raise LoraqError(f"{where}: field {name!r} {problem} (the {kind} format has {_FIELDS[kind]})")
        return value

    if kind == "alpaca":
        instruction, extra = field("instruction"), field("input", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(prompt, field("output"), prompt)
    if kind == "prompt-completion":
        return Example(field("prompt"), field("completion"), field("prompt"))
    if kind == "bigbench":
        return Example(field("input"), field("target"), field("input"))
    if kind == "text":
        text = field("text")
        return Example("", text, text[:200], raw=True)
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LoraqError(f"{where}: field 'messages' must be a non-empty list (the chat format has {_FIELDS['chat']})")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LoraqError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "assistant":
        raise LoraqError(f"{where}: the last message must be the assistant's reply (the one trained on)")
    context = tuple(turns[:-1])
    first_user = next((c for r, c in context if r == "user"), "")
    return Example(first_user, turns[-1][1], json.dumps(context), context=context)


def _detect(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "input" in record and "target" in record:
        return "bigbench"
    if "text" in record:
        return "text"
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoraqError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise LoraqError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _read_jsonl(path: Path) -> list[tuple[str, object]]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise LoraqError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from None
    return records


def _read_csv(path: Path) -> list[tuple[str, object]]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]
    except csv.Error as e:
        raise LoraqError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _read_parquet(path: Path) -> list[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoraqError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError for bad files
        raise LoraqError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows)]


def _read_hub_dataset(spec: str) -> list[tuple[str, object]]:
    """`hf:owner/name` or `hf:owner/name:split` through the `datasets` package (needs network once)."""
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise LoraqError(f"data (--data) hf:{spec}: Hugging Face datasets need `pip install datasets`") from None
    try:
        rows = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, unknown dataset, unknown split...
        raise LoraqError(f"data (--data) hf:{spec}: could not load ({type(e).__name__}: {e})") from None
    return [(f"hf:{spec} row {i}", dict(row)) for i, row in enumerate(rows)]


def load_e2e(path: str | os.PathLike) -> list[Example]:
    """Read a bigbench task.json ({"examples": [{"input": attributes, "target": text}, ...]})."""
    path = Path(path)
    raw = _read_json(path)
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
    return format_context(tokenizer, (("user", prompt),))


def format_context(tokenizer, turns: tuple[tuple[str, str], ...]) -> str:
    """A conversation up to the assistant's reply, with the chat template (or the fallback template)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if len(turns) == 1 and turns[0][0] == "user":
        return FALLBACK_TEMPLATE.format(prompt=turns[0][1])
    return "".join(f"### {role.capitalize()}:\n{content}\n\n" for role, content in turns) + "### Response:\n"


@dataclass
class EncodeStats:
    dropped: int = 0  # prompt alone too long, or too long with drop_long
    truncated: int = 0  # cut to max_length


def encode(
    tokenizer, example: Example, max_length: int, drop_long: bool = False, train_on_prompt: bool = False
) -> tuple[dict[str, list[int]] | None, bool]:
    """Token ids and labels for one example, and whether it was truncated.

    Labels are IGNORE_INDEX on the prompt (the loss is on the response) unless `train_on_prompt`; plain
    text examples are trained on every token. The response is followed by the end-of-sequence token so the
    model learns to stop. Returns None when the prompt alone fills `max_length`, or when the example is too
    long and `drop_long`.
    """
    if example.raw:
        prompt_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    else:
        context = example.context or (("user", example.prompt),)
        prompt_ids = tokenizer(format_context(tokenizer, context), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    too_long = len(prompt_ids) + len(response_ids) > max_length
    if len(prompt_ids) >= max_length or (too_long and drop_long):
        return None, False
    ids = (prompt_ids + response_ids)[:max_length]
    prompt_labels = prompt_ids if (train_on_prompt or example.raw) else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}, too_long


def encode_all(
    tokenizer, examples: list[Example], max_length: int, drop_long: bool = False, train_on_prompt: bool = False
) -> tuple[list[dict], EncodeStats]:
    """Encode every example; return the encoded ones and how many were dropped or truncated."""
    kept, stats = [], EncodeStats()
    for ex in examples:
        item, truncated = encode(tokenizer, ex, max_length, drop_long, train_on_prompt)
        if item is None:
            stats.dropped += 1
        else:
            kept.append(item)
            stats.truncated += int(truncated)
    return kept, stats


def pack(items: list[dict], max_length: int, seed: int = 0) -> list[dict]:
    """Concatenate encoded examples (in a seeded random order) into sequences of up to `max_length` tokens.

    Each packed sequence carries `position_ids` that restart at 0 for every example; with no attention mask,
    transformers reads them as separate sequences and lets no token attend across an example boundary. The
    first token of each example gets no label, so nothing is predicted across a boundary either.
    """
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    packed: list[dict] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for i in order:
        item = items[i]
        if current["input_ids"] and len(current["input_ids"]) + len(item["input_ids"]) > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += item["input_ids"]
        current["labels"] += [IGNORE_INDEX] + item["labels"][1:]
        current["position_ids"] += list(range(len(item["input_ids"])))
    if current["input_ids"]:
        packed.append(current)
    return packed


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into (B, T) tensors (packed ones get position_ids instead of an
    attention mask; their padding continues the last example's positions and carries no label)."""
    width = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    packed = "position_ids" in items[0]
    positions = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
        if packed:
            last = it["position_ids"][-1]
            positions[i, :n] = torch.tensor(it["position_ids"])
            positions[i, n:] = torch.arange(last + 1, last + 1 + width - n)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if packed:
        batch["position_ids"] = positions
    return batch


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


@dataclass
class RunData:
    """A run's data, encoded: training and validation items, the held-out test examples, and the counts."""

    train: list[dict]
    val: list[dict]
    test: list[Example]
    truncated: int
    dropped: int


def run_splits(data: str, data_format: str = "auto", val_data: str = "") -> Splits:
    """A run's splits: with `val_data` all of `data` trains and `val_data` validates (and is the test set);
    else `data` is split by group (80/10/10)."""
    if val_data:
        held_out = load_examples(val_data, data_format)
        return Splits(load_examples(data, data_format), held_out, held_out)
    return split_by_group(load_examples(data, data_format))


def encode_run_data(config, tokenizer) -> RunData:
    """Load, split and encode a run's data as its TrainConfig says (max_length, too_long, train_on_prompt):
    the one place that decides what a run trains, validates and calibrates on."""
    splits = run_splits(config.data, config.data_format, config.val_data)
    options = dict(drop_long=config.too_long == "drop", train_on_prompt=config.train_on_prompt)
    train, stats = encode_all(tokenizer, splits.train, config.max_length, **options)
    val, val_stats = encode_all(tokenizer, splits.val or splits.test, config.max_length, **options)
    return RunData(
        train, val, splits.test or splits.val, stats.truncated + val_stats.truncated, stats.dropped + val_stats.dropped
    )
