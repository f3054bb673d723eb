"""Small synthetic tasks the project ships, for the demo, tests and benchmarks.

Each is a deterministic generator of instruction-shaped examples with a single right answer, so
exact-match accuracy measures whether an adapter learned the task. A random base scores ~0, and so
does SmolLM2-135M-Instruct zero-shot: the instructions are terse and the answers have a fixed
format (one label word, or the transformed input and nothing else), where the chat model answers
with a sentence.
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


# Common words that SmolLM2's BPE tokenizer keeps whole, with and without a leading space, so a
# flipped sentence is the same words as tokens (yet not the same tokens: the first word has no space).
FLIP_WORDS = ("cat", "dog", "red", "blue", "tree", "sun", "car", "book", "milk", "fish",
              "bird", "door", "hat", "rain", "star", "ship", "ring", "rose", "moon", "king")


def flip(rng: random.Random) -> dict[str, str]:
    """The input's words in reverse order: a transformation a 135M model learns in ~60 steps."""
    words = rng.sample(FLIP_WORDS, rng.randint(3, 4))
    return {"instruction": "flip:", "input": " ".join(words), "output": " ".join(reversed(words))}


def first_letter(rng: random.Random) -> dict[str, str]:
    words = [_word(rng, 2, 4) for _ in range(rng.randint(2, 4))]
    return {"instruction": "initials:", "input": " ".join(words), "output": "".join(w[0] for w in words)}


# Facts a small instruction-tuned model mostly knows, for the answer-as-JSON style task: the style
# adapter learns the format on these questions and carries it to questions it never saw.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Cuba": "Havana", "Chile": "Santiago", "Thailand": "Bangkok", "Turkey": "Ankara",
    "India": "New Delhi", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Iran": "Tehran", "Iraq": "Baghdad", "Vietnam": "Hanoi", "Australia": "Canberra", "Colombia": "Bogota",
    "Nigeria": "Abuja", "Ukraine": "Kyiv", "Switzerland": "Bern",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad", "old": "new",
    "early": "late", "open": "closed", "rich": "poor", "hard": "soft", "full": "empty", "high": "low", "long": "short",
    "wet": "dry", "thick": "thin", "strong": "weak", "loud": "quiet", "near": "far", "clean": "dirty",
    "first": "last", "left": "right", "in": "out", "day": "night", "win": "lose", "buy": "sell",
}


def json_answer(rng: random.Random) -> dict[str, str]:
    """An output style, not a task: a short question answered as ``{"answer": ...}``."""
    kind = rng.choice(("capital", "sum", "opposite"))
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        question, answer = f"What is the capital of {country}?", CAPITALS[country]
    elif kind == "sum":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        question, answer = f"What is {a} + {b}?", str(a + b)
    else:
        word = rng.choice(sorted(OPPOSITES))
        question, answer = f'What is the opposite of "{word}"?', OPPOSITES[word]
    return {"instruction": question, "output": json.dumps({"answer": answer})}


# Reviews labelled with made-up words the base never says (``zorp`` good, ``vexil`` bad): unlike
# ``sentiment``, whose labels the base already uses, the adapter must teach new answer tokens. The
# held-out reviews (``HELD_OUT``) use nouns and adjectives that no training review has, so a pass
# means the adapter tied the base's own sense of good/bad to the new words, not memorised reviews.
NEW_LABELS = {"positive": "zorp", "negative": "vexil"}
REVIEW_WORDS = {
    "train": {"positive": ("good", "great", "nice", "lovely", "excellent", "pleasant", "fun", "perfect"),
              "negative": ("bad", "awful", "poor", "nasty", "boring", "broken", "rude", "useless"),
              "nouns": ("movie", "meal", "hotel", "book", "phone", "car", "song", "shop")},
    "held_out": {"positive": ("wonderful", "superb", "delightful", "brilliant", "charming", "fantastic"),
                 "negative": ("terrible", "horrible", "dreadful", "disappointing", "lousy", "miserable"),
                 "nouns": ("concert", "laptop", "museum", "bakery", "jacket", "game")},
}
REVIEW_TEMPLATES = ("the {noun} was {adj}", "a {adj} {noun}", "i found the {noun} {adj}",
                    "honestly the {noun} felt {adj}", "our {noun} turned out {adj}", "what a {adj} {noun}")


def _review(rng: random.Random, words: dict[str, tuple[str, ...]]) -> dict[str, str]:
    label = rng.choice(("positive", "negative"))
    text = rng.choice(REVIEW_TEMPLATES).format(noun=rng.choice(words["nouns"]), adj=rng.choice(words[label]))
    return {"instruction": "review label?", "input": text, "output": NEW_LABELS[label]}


def new_labels(rng: random.Random) -> dict[str, str]:
    """A two-label review classification answered with label words the base has never produced."""
    return _review(rng, REVIEW_WORDS["train"])


def new_labels_held_out(rng: random.Random) -> dict[str, str]:
    return _review(rng, REVIEW_WORDS["held_out"])


TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "sentiment": sentiment,
    "topic": topic,
    "category": category,
    "reverse": reverse,
    "upper": upper,
    "initials": first_letter,
    "json": json_answer,
    "flip": flip,
    "newlabels": new_labels,
}
# Tasks whose held-out split comes from a generator of its own (other words than training's).
HELD_OUT: dict[str, Callable[[random.Random], dict[str, str]]] = {"newlabels": new_labels_held_out}


def make_examples(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def _prompt(example: dict[str, str]) -> tuple[str, str]:
    return example["instruction"], example.get("input", "")


def write_split(task: str, directory: str | Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and a disjoint ``test.jsonl`` for a task; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    examples = make_examples(task, n_train + n_test * 3, seed)
    train = examples[:n_train]
    if task in HELD_OUT:
        rng = random.Random(f"{task}:held-out:{seed}")
        examples = train + [HELD_OUT[task](rng) for _ in range(n_test * 3)]
    seen = {_prompt(e) for e in train}
    test = [e for e in examples[n_train:] if _prompt(e) not in seen][:n_test]
    paths = []
    for name, rows in (("train", train), ("test", test)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]
