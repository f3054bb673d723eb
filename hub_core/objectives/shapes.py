"""The data shapes of the objectives beyond SFT, validated line by line.

Every row becomes TRL's conversational format (lists of ``{"role", "content"}`` turns), so a prompt
is rendered by the tokenizer's chat template exactly as SFT training and the server render it. A
prompt may be given three ways: ``"prompt"`` (a string, or a list of turns), ``"messages"`` (the
turns before the answer) or the instruction shape (``"instruction"``, ``"input"``?) that SFT reads.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from adapterhub.chat import ROLES
from adapterhub.data import iter_jsonl
from adapterhub.errors import DataError

PROMPT_KEYS = '"prompt" | "messages" | "instruction" (+ "input")'
PAIRS_SHAPE = '{' + PROMPT_KEYS + ', "chosen", "rejected"}'
UNPAIRED_SHAPE = '{' + PROMPT_KEYS + ', "completion", "label": true | false}'
PROMPTS_SHAPE = '{' + PROMPT_KEYS + ', ...columns your reward function reads}'


def _turns(value: Any, key: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a string or a non-empty list of {{role, content}} turns")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_turns(example: Any, where: str) -> list[dict[str, str]]:
    """The turns before the answer, from whichever prompt key the line uses."""
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}")
    given = [k for k in ("prompt", "messages", "instruction") if k in example]
    if len(given) != 1:
        keys = ", ".join(sorted(example)) or "none"
        raise DataError(f"{where}: give the prompt as exactly one of {PROMPT_KEYS} (keys here: {keys})")
    key = given[0]
    value = example[key]
    if key == "instruction":
        extra = example.get("input")
        if not isinstance(value, str) or not value or not isinstance(extra, (str, type(None))):
            raise DataError(f"{where}: 'instruction' must be a non-empty string and 'input' a string when present")
        turns = [{"role": "user", "content": f"{value}\n\n{extra}" if extra else value}]
    elif isinstance(value, str):
        if not value:
            raise DataError(f"{where}: '{key}' is empty")
        turns = [{"role": "user", "content": value}]
    else:
        turns = _turns(value, key, where)
    if turns[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt's last turn must be from the user (the model answers it), "
                        f"got {turns[-1]['role']!r}")
    return turns


def answer_turns(example: dict[str, Any], key: str, where: str) -> list[dict[str, str]]:
    """An answer: a non-empty string, or a list of one assistant turn."""
    if key not in example:
        raise DataError(f"{where}: missing '{key}'")
    value = example[key]
    if isinstance(value, str):
        turns = [{"role": "assistant", "content": value}]
    else:
        turns = _turns(value, key, where)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise DataError(f"{where}: '{key}' must be a string or a list of exactly one assistant turn")
    if not turns[0]["content"].strip():
        raise DataError(f"{where}: '{key}' is empty; there would be nothing to learn from it")
    return turns


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Preference pairs: ``{"prompt": turns, "chosen": [turn], "rejected": [turn]}`` per line."""
    rows = []
    for where, example in iter_jsonl(path):
        row = {"prompt": prompt_turns(example, where), "chosen": answer_turns(example, "chosen", where),
               "rejected": answer_turns(example, "rejected", where)}
        if row["chosen"] == row["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer; a pair needs two different ones")
        rows.append(row)
    return rows


def read_unpaired(path: str | Path) -> list[dict[str, Any]]:
    """Unpaired judgements: ``{"prompt": turns, "completion": [turn], "label": bool}`` per line."""
    rows = []
    for where, example in iter_jsonl(path):
        prompt = prompt_turns(example, where)
        completion = answer_turns(example, "completion", where)
        if not isinstance(example.get("label"), bool):
            raise DataError(f"{where}: 'label' must be true (a good answer) or false (a bad one), "
                            f"got {example.get('label')!r}")
        rows.append({"prompt": prompt, "completion": completion, "label": example["label"]})
    return rows


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts: ``{"prompt": turns, ...}``; other columns are kept for reward functions."""
    rows = []
    for where, example in iter_jsonl(path):
        prompt = prompt_turns(example, where)
        extra = {k: v for k, v in example.items() if k not in ("prompt", "messages", "instruction", "input")}
        rows.append({**extra, "prompt": prompt})
    return rows


def split_rows(rows: list[Any], fraction: float, seed: int, source: str) -> tuple[list[Any], list[Any]]:
    """A deterministic train/eval split (the same rule as SFT's); the eval part has one row at least."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(order) * fraction)))
    if n_eval >= len(order):
        raise DataError(f"{source}: {len(order)} examples are too few for an eval split of {fraction}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
