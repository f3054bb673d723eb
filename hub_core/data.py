"""Training data: JSON Lines in the instruction shape or the chat shape.

Both shapes are rendered through the tokenizer's chat template (an instruction example becomes a
user turn and an assistant turn), so the server later builds prompts exactly as training saw them.
Labels cover assistant tokens only. A bad line fails with the file name, line number and reason;
nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .chat import ROLES, render_prompt
from .errors import DataError

IGNORE_INDEX = -100
MAX_LINE_BYTES = 1 << 20  # a 1 MiB line is almost certainly not a training example


def instruction_to_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """The alpaca shape as chat turns: instruction (+ input) as the user, output as the assistant."""
    prompt = example["instruction"]
    if example.get("input"):
        prompt = f"{prompt}\n\n{example['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}]


def _validate(example: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}")
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be from the assistant (it is what the model learns)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in example or "output" in example:
        for key in ("instruction", "output"):
            if not isinstance(example.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string (instruction shape: instruction, input?, output)")
        if "input" in example and not isinstance(example["input"], (str, type(None))):
            raise DataError(f"{where}: 'input' must be a string when present")
        if not example["output"]:
            raise DataError(f"{where}: 'output' is empty; there would be nothing to learn")
        return instruction_to_messages(example)
    keys = ", ".join(sorted(example)) or "none"
    raise DataError(
        f"{where}: unknown example shape (keys: {keys}); use {{\"instruction\", \"input\"?, \"output\"}} "
        "or {\"messages\": [{\"role\", \"content\"}, ...]}"
    )


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", parsed object)`` for every non-blank line; a bad line is a DataError naming it.

    Every objective's data shape reads its file through this, so all report errors the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    found = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line:
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            found = True
            yield where, example
    if not found:
        raise DataError(f"data file {path} has no examples; it needs one JSON object per line")


def read_examples(path: str | Path) -> list[list[dict[str, str]]]:
    """Every example of a JSONL file as a list of chat messages."""
    return [_validate(example, where) for where, example in iter_jsonl(path)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Token ids and labels; labels are IGNORE_INDEX everywhere but the assistant turns.

    Each assistant turn is located by rendering the conversation up to it with the generation
    prompt (the prefix) and including it (the prefix plus the answer).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _encode(tokenizer, render_prompt(tokenizer, messages[:i]))
        full = _encode(tokenizer, tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if full[: len(prefix)] != prefix or len(prefix) < len(input_ids):
            raise DataError("the tokenizer's chat template does not render conversations prefix-consistently")
        new_context = prefix[len(input_ids):]
        answer = full[len(prefix):]
        input_ids += new_context + answer
        labels += [IGNORE_INDEX] * len(new_context) + answer
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class TokenizedDataset:
    """A list of tokenized examples (the Trainer needs only ``__len__`` and ``__getitem__``)."""

    items: list[dict[str, list[int]]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return iter(self.items)

    def split(self, fraction: float, seed: int) -> tuple["TokenizedDataset", "TokenizedDataset"]:
        """Deterministic train/eval split; the eval part has at least one example."""
        import random

        if not 0 < fraction < 1:
            raise DataError(f"eval split must be between 0 and 1 (exclusive), got {fraction}")
        order = list(range(len(self.items)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(round(len(order) * fraction)))
        if n_eval >= len(order):
            raise DataError(f"{self.source}: {len(order)} examples are too few for an eval split of {fraction}")
        eval_idx = set(order[:n_eval])
        train = [x for i, x in enumerate(self.items) if i not in eval_idx]
        evals = [x for i, x in enumerate(self.items) if i in eval_idx]
        return TokenizedDataset(train, self.source), TokenizedDataset(evals, self.source)


def load_dataset(path: str | Path, tokenizer: Any, max_length: int = 512) -> TokenizedDataset:
    """Read, validate and tokenize a JSONL file."""
    return tokenize_examples(read_examples(path), tokenizer, max_length, str(path))


def tokenize_examples(examples: list[list[dict[str, str]]], tokenizer: Any, max_length: int,
                      source: str) -> TokenizedDataset:
    """Examples read by :func:`read_examples`, tokenized; one without answer tokens is an error."""
    items = []
    for lineno, messages in enumerate(examples, start=1):
        item = tokenize_example(tokenizer, messages, max_length)
        if not any(label != IGNORE_INDEX for label in item["labels"]):
            raise DataError(
                f"{source}: example {lineno} has no answer tokens within max_length={max_length}; "
                "shorten the prompt or raise max_length"
            )
        items.append(item)
    return TokenizedDataset(items, source)


class CausalCollator:
    """Right-pads a batch; padded positions are masked and ignored by the loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[row, :n] = torch.tensor(x["input_ids"])
            labels[row, :n] = torch.tensor(x["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
