"""Small synthetic tasks the project ships, for the demo, tests and benchmarks.

Each is a deterministic generator of instruction-shaped examples with a single right answer, so
exact-match accuracy measures whether an adapter learned the task. A random base scores ~0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"
POSITIVE = ("good", "great", "happy", "love", "nice", "fine", "bright", "warm", "kind", "fun")
NEGATIVE = ("bad", "sad", "hate", "awful", "poor", "dark", "cold", "mean", "dull", "ugly")
NEUTRAL = ("the", "a", "day", "food", "movie", "car", "book", "song", "room", "team", "was", "is", "very")


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def sentiment(rng: random.Random) -> dict[str, str]:
    label = rng.choice(("positive", "negative"))
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 4))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
    return {"instruction": "sentiment?", "input": " ".join(words), "output": label}


TOPICS = {
    "sport": ("ball", "goal", "team", "race", "coach", "match"),
    "food": ("bread", "soup", "rice", "cake", "salt", "meal"),
    "music": ("song", "drum", "band", "tune", "piano", "choir"),
}
CATEGORIES = {
    "animal": ("cat", "dog", "fox", "owl", "cow", "bee"),
    "color": ("red", "blue", "green", "pink", "gray", "gold"),
    "number": ("one", "two", "six", "ten", "five", "nine"),
}
FILLER = ("the", "a", "my", "new", "old", "big", "we", "saw", "had", "one")


def topic(rng: random.Random) -> dict[str, str]:
    label = rng.choice(sorted(TOPICS))
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[label]))
    return {"instruction": "topic?", "input": " ".join(words), "output": label}


def category(rng: random.Random) -> dict[str, str]:
    label = rng.choice(sorted(CATEGORIES))
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(CATEGORIES[label]))
    return {"instruction": "category?", "input": " ".join(words), "output": label}


def reverse(rng: random.Random) -> dict[str, str]:
    word = _word(rng)
    return {"instruction": "reverse:", "input": word, "output": word[::-1]}


def upper(rng: random.Random) -> dict[str, str]:
    word = _word(rng)
    return {"instruction": "upper:", "input": word, "output": word.upper()}


def first_letter(rng: random.Random) -> dict[str, str]:
    words = [_word(rng, 2, 4) for _ in range(rng.randint(2, 4))]
    return {"instruction": "initials:", "input": " ".join(words), "output": "".join(w[0] for w in words)}


TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "sentiment": sentiment,
    "topic": topic,
    "category": category,
    "reverse": reverse,
    "upper": upper,
    "initials": first_letter,
}


def make_examples(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def write_split(task: str, directory: str | Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and a disjoint ``test.jsonl`` for a task; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    examples = make_examples(task, n_train + n_test * 3, seed)
    train = examples[:n_train]
    seen = {(e["input"]) for e in train}
    test = [e for e in examples[n_train:] if e["input"] not in seen][:n_test]
    paths = []
    for name, rows in (("train", train), ("test", test)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]
