"""Rewards for the ``grpo`` objective: what a ``reward`` spec names, and built-in verifiable rewards.

A spec names one reward, or several separated by commas, each optionally weighted (``2*keyword``):
their weighted sum scores a completion.

==============================  ===============================================================
``json_answer``, ``max_words``,  a built-in reward (below)
``keyword``
``NAME``                        a function published under the entry-point group
                                ``adapterhub.rewards`` (built-in names come first)
``package.module:function``     any importable function; ``path/to/file.py:function`` works too
``adapter:TASK@VERSION``        a reward-model adapter from the registry (one trained with
                                ``--objective reward``); ``@latest`` and tags resolve when the run
                                is checked, so the lineage names the exact version
==============================  ===============================================================

A reward function has TRL's signature: ``f(prompts, completions, **columns) -> list[float | None]``,
one value per completion (None: this function does not score it). ``prompts`` and
``completions`` are lists of ``{"role", "content"}`` turns (conversational data, which ``grpo``
always uses; plain strings are accepted too); every other column of the data line arrives as a
keyword argument holding one value per completion, so a reward can read the expected answer.
Accept ``**kwargs``: TRL passes more (``completion_ids``, ``trainer_state``, ``log_metric``).

Publishing a reward function from another distribution (no change here)::

    # pyproject.toml of my-rewards
    [project.entry-points."adapterhub.rewards"]
    exact_sum = "my_rewards:exact_sum"

then ``pip install my-rewards`` and train with ``--objective-set reward=exact_sum``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable

from adapterhub.errors import AdapterHubError
from adapterhub.objective import SEQUENCE_CLASSIFICATION
from adapterhub.objectives.scoring import RewardModel
from adapterhub.registry import open_registry

from .errors import ConfigError

ENTRY_POINT_GROUP = "adapterhub.rewards"
ADAPTER_PREFIX = "adapter:"
SPEC_HELP = ("json_answer | max_words | keyword | an entry-point name | module:function | path/file.py:function | "
             "adapter:TASK@VERSION; comma-separated, optionally weighted (2*keyword,max_words), to sum several")


# -- completions as text ------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The answer's text, from a list of turns (conversational) or a plain string."""
    if isinstance(completion, str):
        return completion
    turns = [t for t in completion if t.get("role") == "assistant"] or list(completion)
    return "".join(str(t.get("content", "")) for t in turns)


def prompt_turns(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _column(kwargs: dict[str, Any], name: str, n: int, default: Any) -> list[Any]:
    values = kwargs.get(name)
    return list(values) if values is not None else [default] * n


# -- built-in verifiable rewards ----------------------------------------------------------------


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_answer(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0: the whole answer is a JSON object with an ``"answer"`` key; 0.5: such an object inside
    other text, or a JSON object without ``"answer"``; 0.2: braces that do not parse; else 0.

    The partial credit gives a model that cannot yet write JSON a gradient towards it.
    """
    scores = []
    for completion in completions:
        text = completion_text(completion).strip()
        whole = _json_object(text)
        start, end = text.find("{"), text.rfind("}")
        inner = _json_object(text[start:end + 1]) if 0 <= start < end else None
        if whole is not None and "answer" in whole:
            scores.append(1.0)
        elif whole is not None or (inner is not None and "answer" in inner):
            scores.append(0.5)
        elif 0 <= start < end:
            scores.append(0.2)
        else:
            scores.append(0.0)
    return scores


def max_words(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for a non-empty answer of at most N words (the data's ``max_words`` column, default 10),
    N / words above it, 0 for an empty answer."""
    limits = _column(kwargs, "max_words", len(completions), 10)
    scores = []
    for completion, limit in zip(completions, limits):
        words = len(completion_text(completion).split())
        scores.append(0.0 if words == 0 else min(1.0, int(limit) / words))
    return scores


def keyword(completions: list[Any], **kwargs: Any) -> list[float]:
    """The share of the data's ``keyword`` column (a word or a list of words) that the answer
    contains, case-insensitively, as whole words."""
    if kwargs.get("keyword") is None:
        raise ConfigError("the keyword reward reads a 'keyword' column: add \"keyword\": \"WORD\" (or a list) "
                          "to every data line")
    scores = []
    for completion, wanted in zip(completions, kwargs["keyword"]):
        words = [wanted] if isinstance(wanted, str) else list(wanted or [])
        text = completion_text(completion)
        found = sum(bool(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.I)) for w in words)
        scores.append(found / len(words) if words else 0.0)
    return scores


BUILTIN: dict[str, Callable[..., list[float]]] = {"json_answer": json_answer, "max_words": max_words,
                                                   "keyword": keyword}
COLUMNS: dict[str, str] = {"keyword": "keyword"}
"""Built-in rewards that cannot score a line without a column (checked before training)."""


# -- a reward model from the registry -----------------------------------------------------------


class AdapterReward:
    """A registered reward-model adapter as a TRL reward function.

    The model loads on first use (or :meth:`load`), never while the run is checked: checking stays
    light, and a run refused for another reason never loads a second model.
    """

    def __init__(self, reference: str, registry: str | None = None) -> None:
        self.reference = reference
        self.registry = registry
        self.__name__ = reference  # TRL logs each reward as rewards/<name>/mean
        self.model: Any = None

    def load(self, *, base: str | None = None, device: str | None = None) -> "AdapterReward":
        if self.model is None:
            self.model = RewardModel.load(self.reference, registry=self.registry, base=base, device=device)
        return self

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        self.load()
        return self.model.score([prompt_turns(p) for p in prompts], [completion_text(c) for c in completions])


def resolve_adapter(reference: str, registry: str | None) -> tuple[AdapterReward, str]:
    """The registry's exact version for ``reference``; refuses one that is not a reward model."""

    if not reference:
        raise ConfigError("reward 'adapter:' names no adapter; e.g. reward=adapter:sentiment-rm@1")
    try:
        manifest = open_registry(registry).manifest(reference)
    except AdapterHubError as exc:
        raise ConfigError(f"reward adapter:{reference}: {exc} (train one with `adapterhub train --objective reward "
                          f"--task NAME ...`, or pass --registry where it lives)") from None
    objective = manifest.training.get("objective") or {}
    if objective.get("head") != SEQUENCE_CLASSIFICATION:
        raise ConfigError(f"reward adapter:{reference} ({manifest.ref}) is not a reward model (objective "
                          f"{objective.get('name', 'sft')!r}: it generates answers, it has no score head); train one "
                          "with `adapterhub train --objective reward --data PAIRS.jsonl ...`")
    resolved = "" if manifest.ref == reference else f" (resolved from {reference})"
    return AdapterReward(manifest.ref, registry), f"adapter {manifest.ref}{resolved}"


# -- resolution ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reward:
    """One resolved reward: the function TRL calls, its weight in the sum, the line the registry records."""

    function: Callable[..., Any]
    description: str
    weight: float = 1.0


def resolve_rewards(spec: str, *, registry: str | None = None) -> list[Reward]:
    """Every reward a (comma-separated) spec names, each optionally weighted (``2*keyword``);
    ``ConfigError`` names a bad one and the fix."""
    parts = [part.strip() for part in (spec or "").split(",")]
    if not any(parts):
        raise ConfigError(f"grpo needs a reward: --objective-set reward=NAME, where NAME is {SPEC_HELP}")
    if not all(parts):
        raise ConfigError(f"reward={spec!r} has an empty entry; separate rewards with single commas")
    rewards = []
    for part in parts:
        weight, name = _weighted(part)
        function, description = resolve_reward(name, registry=registry)
        rewards.append(Reward(function, description if weight == 1 else f"{weight:g} x {description}", weight))
    return rewards


def _weighted(part: str) -> tuple[float, str]:
    """``"2*keyword"`` -> ``(2.0, "keyword")``; a weight says how much this reward counts in the sum."""
    import math

    head, star, rest = part.partition("*")
    if not star:
        return 1.0, part
    try:
        weight = float(head)
    except ValueError:
        raise ConfigError(f"reward {part!r}: the weight before '*' must be a number, e.g. 2*keyword") from None
    if not math.isfinite(weight):
        raise ConfigError(f"reward {part!r}: the weight must be a finite number")
    return weight, rest.strip()


def resolve_reward(spec: str, *, registry: str | None = None) -> tuple[Callable[..., Any], str]:
    """One reward spec as ``(function, description)``; see the module docstring for the syntax."""
    spec = spec.strip()
    if spec.startswith(ADAPTER_PREFIX):
        return resolve_adapter(spec[len(ADAPTER_PREFIX):].strip(), registry)
    if spec in BUILTIN:
        return BUILTIN[spec], f"built-in {spec}"
    if ":" in spec:
        return _from_path(spec)
    return _from_entry_point(spec)


def _from_path(spec: str) -> tuple[Callable[..., Any], str]:
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ConfigError(f"reward {spec!r} is not module:function; e.g. reward=my_rewards:exact_match")
    try:
        if module_name.endswith(".py"):
            module, where = _module_from_file(Path(module_name)), str(Path(module_name).resolve())
        else:
            module, where = importlib.import_module(module_name), module_name
    except ImportError as exc:
        raise ConfigError(f"reward {spec!r}: cannot import {module_name!r} ({exc}); install its package or put "
                          "its folder on PYTHONPATH") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        what = "has no attribute" if function is None else "has a non-callable"
        raise ConfigError(f"reward {spec!r}: module {module_name!r} {what} {attribute!r}; name a function "
                          "f(prompts, completions, **columns) -> list[float]")
    source = getattr(module, "__file__", None)
    return function, f"{where}:{attribute}" + (f" ({source})" if source and not module_name.endswith(".py") else "")


def _module_from_file(path: Path) -> Any:
    import importlib.util

    if not path.is_file():
        raise ImportError(f"no file {path}")
    spec = importlib.util.spec_from_file_location(f"adapterhub_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _from_entry_point(name: str) -> tuple[Callable[..., Any], str]:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = sorted(set(BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
        raise ConfigError(f"reward {name!r} is neither a built-in nor an entry point in group {ENTRY_POINT_GROUP!r} "
                          f"(known: {', '.join(known)}); give module:function, or adapter:TASK@VERSION for a "
                          "reward model")
    ep = found[0]
    dist = f"{ep.dist.name} {ep.dist.version}" if getattr(ep, "dist", None) else "unknown distribution"
    try:
        function = ep.load()
    except Exception as exc:  # a broken third-party package: name it
        raise ConfigError(f"reward {name!r}: entry point {ep.value} from {dist} failed to load: {exc}") from None
    if not callable(function):
        raise ConfigError(f"reward {name!r}: entry point {ep.value} from {dist} is not callable")
    return function, f"entry point {name} = {ep.value} ({dist})"
