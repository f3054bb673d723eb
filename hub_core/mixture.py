"""Multi-task data: several ``--data`` files mixed into one training set, each task held out alone.

A file is a task, named by its stem or ``name=`` (``--data topic.jsonl:weight=2,name=topics``).
Without weights the files are concatenated (every example once per epoch, LLaMA-Factory's
``mix_strategy: concat``). With weights (``:weight=W`` or ``--data-weights 1,2``, LLaMA-Factory's
``interleave_probs``) or a temperature (``--data-temperature T``: T5/mT5's p_i ~ n_i ** (1/T), so
T=1 is examples-proportional and a large T uniform), task i gets the share p_i of a mixed set that
keeps the concatenation's size: small tasks repeat (whole reshuffled passes), large ones are
subsampled. Exact counts, not a multinomial draw, so the proportions hold on small data too.

Why not ``datasets.interleave_datasets``: its length follows its stopping strategy (first_exhausted
stops at min n_i/p_i and drops most of a large task; all_exhausted runs to max n_i/p_i, 100x the
data for a 1%-weight task), and it needs one Arrow schema across files. The Trainer still owns the
loop and shuffles this set each epoch; a subsampled task meets the same subset every epoch.

Everything here runs before the base loads, so a bad weight, an unknown file or a file in another
objective's shape costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .objectives.shapes import split_rows

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SPEC_KEYS = ("weight", "name")
WEIGHTS_WHERE = "--data-weights / YAML 'data_weights:'"
TEMPERATURE_WHERE = "--data-temperature / YAML 'data_temperature:'"


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One ``--data`` file: a task of the mixture."""

    path: Path
    name: str
    weight: float | None = None


@dataclasses.dataclass
class Mixture:
    """The mixed training rows, the held-out rows per task, and what the manifest records."""

    rows: list[Any]
    tasks: list[str]
    """The task of each training row (same order as ``rows``)."""
    eval_rows: list[Any] | None
    eval_tasks: dict[str, list[Any]] | None
    """Held-out rows per task (their concatenation is ``eval_rows``); None with ``--eval-data``."""
    lineage: dict[str, Any]


# -- what the user wrote -------------------------------------------------------------------------


def parse_sources(data: Any, weights: Any = None, temperature: Any = None) -> list[DataSource]:
    """The files of ``--data`` (a path, or a list of paths / ``PATH:weight=W,name=N`` strings /
    YAML ``{path, weight, name}`` mappings), each with a task name and a weight, all checked."""

    entries = data if isinstance(data, (list, tuple)) else [data]
    if not entries:
        raise ConfigError("train needs --data (or 'data:' in --config)")
    sources = [_source(entry) for entry in entries]
    for source in sources:
        if not source.path.is_file():
            raise ConfigError(f"--data {source.path}: file not found")
    _check_names(sources)
    per_file = [s.weight for s in sources if s.weight is not None]
    if weights is not None and per_file:
        raise ConfigError(f"weights given twice: per file (':weight=') and by {WEIGHTS_WHERE}; keep one of them")
    if temperature is not None and (weights is not None or per_file):
        raise ConfigError(f"{TEMPERATURE_WHERE} and weights are exclusive: the temperature sets the weights "
                          "from the file sizes; keep one of them")
    if temperature is not None:
        parse_temperature(temperature)
    if weights is not None:
        values = parse_weights(weights, sources)
        sources = [dataclasses.replace(s, weight=w) for s, w in zip(sources, values)]
    elif per_file:
        sources = [s if s.weight is not None else dataclasses.replace(s, weight=1.0) for s in sources]
    given = [s.weight for s in sources if s.weight is not None]
    if given and sum(given) <= 0:
        raise ConfigError(f"every --data weight is 0 ({', '.join(s.name for s in sources)}): nothing to train on; "
                          "give at least one file a positive weight, e.g. --data-weights 1,1")
    return sources


def _source(entry: Any) -> DataSource:
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"path", *SPEC_KEYS})
        if "path" not in entry or unknown:
            raise ConfigError(f"YAML 'data:' entry {entry!r}: give a mapping with 'path' and optionally 'weight', "
                              f"'name'{' (unknown: ' + ', '.join(unknown) + ')' if unknown else ''}")
        return _make(str(entry["path"]), {k: entry[k] for k in SPEC_KEYS if k in entry})
    if not isinstance(entry, (str, Path)) or not str(entry):
        raise ConfigError(f"--data {entry!r}: expected a file path (optionally PATH:weight=W,name=N)")
    text = str(entry)
    path, sep, tail = text.rpartition(":")
    if not sep or Path(text).exists() or "=" not in tail:
        return _make(text, {})  # a plain path (one that holds a ':' too)
    settings: dict[str, str] = {}
    for part in tail.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in SPEC_KEYS:
            raise ConfigError(f"--data {text}: {part.strip()!r} is not one of weight=W, name=N; write "
                              "PATH:weight=2 or PATH:weight=2,name=topic")
        settings[key] = value.strip()
    return _make(path, settings)


def _make(path: str, settings: dict[str, Any]) -> DataSource:
    weight = None
    if "weight" in settings:
        weight = _number(settings["weight"], f"--data {path}:weight={settings['weight']}")
    name = str(settings.get("name") or Path(path).stem)
    if not NAME.match(name):
        raise ConfigError(f"--data {path}: task name {name!r} is not a valid name (letters, digits, '_', '.', '-'; "
                          f"at most 64); name it: --data {path}:name=mytask")
    return DataSource(Path(path), name, weight)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: a weight is a number >= 0, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number; a weight is a relative sampling rate >= 0, "
                          "e.g. 1 or 2.5") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where}: weight {value!r} must be a finite number >= 0 (a relative sampling rate; "
                          "0 trains nothing on that file, and --eval-split still evaluates it)")
    return number


def parse_weights(weights: Any, sources: list[DataSource]) -> list[float]:
    """``--data-weights 1,2`` (or ``[1, 2]``), one per ``--data`` file, in their order."""
    values = weights
    if isinstance(weights, str):
        text = weights.strip()
        values = json.loads(text) if text.startswith("[") and _is_json(text) else text.split(",")
    if not isinstance(values, (list, tuple)):
        values = [values]
    if len(values) != len(sources):
        raise ConfigError(f"{WEIGHTS_WHERE} has {len(values)} value(s) for {len(sources)} --data file(s) "
                          f"({', '.join(str(s.path) for s in sources)}); give one weight per file, in --data order")
    return [_number(v.strip() if isinstance(v, str) else v, f"{WEIGHTS_WHERE} for {s.path}")
            for v, s in zip(values, sources)]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def parse_temperature(value: Any) -> float:
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        temperature = float("nan")
    if isinstance(value, bool) or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"{TEMPERATURE_WHERE}={value!r} must be a number > 0 (1: proportional to file sizes, "
                          "higher: closer to uniform; T5 used 2-5)")
    return temperature


def _check_names(sources: list[DataSource]) -> None:
    seen: dict[str, Path] = {}
    for source in sources:
        if source.name in seen:
            raise ConfigError(f"--data {seen[source.name]} and {source.path} are both task {source.name!r} (metrics "
                              f"are named by task); name one: --data {source.path}:name=OTHER")
        seen[source.name] = source.path


# -- the mixing ----------------------------------------------------------------------------------


def temperature_probabilities(sizes: list[int], temperature: float) -> list[float]:
    """T5/mT5 temperature sampling: p_i proportional to n_i ** (1 / T)."""
    scaled = [n ** (1.0 / temperature) if n > 0 else 0.0 for n in sizes]
    total = sum(scaled)
    return [s / total for s in scaled]


def share_counts(probabilities: list[float], total: int) -> list[int]:
    """``total`` split by ``probabilities`` into whole counts (largest remainder; they sum to ``total``)."""
    exact = [p * total for p in probabilities]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows_per_task: list[list[Any]], counts: list[int], seed: int) -> tuple[list[Any], list[int]]:
    """``counts[i]`` rows of task i (whole reshuffled passes, then a random part of one), shuffled
    together; returns the rows and each row's task index."""
    rng = random.Random(seed)
    picked: list[tuple[int, Any]] = []
    for task, (rows, count) in enumerate(zip(rows_per_task, counts)):
        order: list[int] = []
        while len(order) < count:
            one_pass = list(range(len(rows)))
            rng.shuffle(one_pass)
            order += one_pass
        picked += [(task, rows[i]) for i in order[:count]]
    rng.shuffle(picked)
    return [row for _, row in picked], [task for task, _ in picked]


def read_mixture(objective: Any, sources: list[DataSource], options: Any, temperature: Any = None) -> Mixture:
    """Read every file in the objective's shape, hold out ``eval_split`` of each, mix the rest."""
    per_file = [read_task(objective, source) for source in sources]
    _check_columns(sources, per_file)
    train_parts, eval_parts = [], []
    for source, rows in zip(sources, per_file):
        if options.eval_split:
            train, held = split_rows(rows, options.eval_split, options.seed, str(source.path))
        else:
            train, held = rows, []
        train_parts.append(train)
        eval_parts.append(held)
    sizes = [len(rows) for rows in train_parts]
    if temperature is not None:
        strategy, probabilities = "temperature", temperature_probabilities(sizes, parse_temperature(temperature))
    elif sources[0].weight is not None:
        total_weight = sum(s.weight or 0.0 for s in sources)
        strategy, probabilities = "weights", [(s.weight or 0.0) / total_weight for s in sources]
    else:
        strategy, probabilities = "concat", [n / sum(sizes) for n in sizes]
    if strategy == "concat":
        counts = sizes
        rows = [row for part in train_parts for row in part]
        task_index = [i for i, part in enumerate(train_parts) for _ in part]
    else:
        counts = share_counts(probabilities, sum(sizes))
        rows, task_index = draw(train_parts, counts, options.seed)
    for source, probability, count in zip(sources, probabilities, counts):
        if probability > 0 and count == 0:
            log.warning("--data %s: its share %.4f of %d examples rounds to none; raise its weight", source.path,
                        probability, sum(sizes))
    eval_tasks = None
    eval_rows = None
    if options.eval_split:
        eval_tasks = {s.name: held for s, held in zip(sources, eval_parts)}
        eval_rows = [row for held in eval_parts for row in held]
    elif options.eval_data:
        eval_rows = objective.read_data(options.eval_data)
    files = [{"name": s.name, "path": str(s.path), "weight": s.weight,
              "probability": round(p, 6), "examples": n, "drawn": c, "eval_examples": len(held)}
             for s, p, n, c, held in zip(sources, probabilities, sizes, counts, eval_parts)]
    lineage = {"strategy": strategy, "files": files}
    if temperature is not None:
        lineage["temperature"] = parse_temperature(temperature)
    return Mixture(rows=rows, tasks=[sources[i].name for i in task_index], eval_rows=eval_rows,
                   eval_tasks=eval_tasks, lineage=lineage)


# -- one shape per run ---------------------------------------------------------------------------

# What a line's keys say it is, and the objective that reads that shape (for the fix in the message).
SHAPES = (
    ({"chosen", "rejected"}, "preference pairs (prompt, chosen, rejected)", "dpo (or reward)"),
    ({"completion", "label"}, "unpaired judgements (prompt, completion, label)", "kto"),
    ({"messages"}, "chat examples (messages)", "sft"),
    ({"output"}, "instruction examples (instruction, input, output)", "sft"),
    ({"prompt"}, "prompts (prompt, ...)", "grpo (or distill)"),
)


def read_task(objective: Any, source: DataSource) -> list[Any]:
    """One file in the objective's shape; a file whose first example is in another objective's
    shape is named as such (a bad line further down keeps its own ``file:line`` error)."""
    try:
        return objective.read_data(source.path)
    except DataError as exc:
        shape = _shape_of(source.path)
        if shape is None:
            raise
        label, reader, lineno = shape
        if not str(exc).startswith(f"{source.path}:{lineno}:") or objective.name in reader.replace(")", "").split():
            raise
        raise DataError(
            f"--data {source.path} holds {label}, but this run's objective {objective.name!r} reads "
            f"{objective.data_shape} from every --data file; convert {source.path}, or train it in a run of its own "
            f"with --objective {reader} ({exc})"
        ) from None


def _shape_of(path: Path) -> tuple[str, str, int] | None:
    try:
        with open(path, encoding="utf-8") as f:
            lineno, first = next(((i, line) for i, line in enumerate(f, start=1) if line.strip()), (0, ""))
        example = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(example, dict):
        return None
    for keys, label, reader in SHAPES:
        if keys <= set(example):
            return label, reader, lineno
    return None


def _check_columns(sources: list[DataSource], per_file: list[list[Any]]) -> None:
    """Rows that are records (every objective but sft) become one table: every file needs the same
    columns, or a column of one file would silently be empty (or dropped) in another's rows."""
    columns = [set().union(*(row.keys() for row in rows)) if rows and isinstance(rows[0], dict) else None
               for rows in per_file]
    if columns[0] is None:
        return
    for source, cols in zip(sources[1:], columns[1:]):
        if cols != columns[0]:
            extra, missing = sorted(cols - columns[0]), sorted(columns[0] - cols)
            raise DataError(
                f"--data {source.path} has other columns than {sources[0].path} "
                f"({'only here: ' + ', '.join(extra) if extra else ''}{'; ' if extra and missing else ''}"
                f"{'missing here: ' + ', '.join(missing) if missing else ''}); the files of one run form one table: "
                "give every file the same columns"
            )


# -- per-task evaluation (the trainer side) -------------------------------------------------------

TIMINGS = ("runtime", "samples_per_second", "steps_per_second", "epoch")
ALL_TASKS = "__all_tasks__"  # never a task name (those start with a letter or digit)


def eval_sets(combined: Any, tasks: dict[str, Any] | None) -> Any:
    """What a trainer is built with: the eval set, or in a multi-task run a dict of it and each
    task's set, so the trainer prepares every one as it prepares its own (TRL tokenizes, filters,
    precomputes reference log-probs). ``training.run_trainer`` takes the dict apart again: training-
    time evaluation and early stopping stay on the whole eval set (``eval_loss``), and each task is
    evaluated alone at the end (``eval_<task>_loss``)."""
    return {ALL_TASKS: combined, **tasks} if tasks else combined


def split_task_sets(trainer: Any) -> dict[str, Any]:
    """The per-task eval sets the trainer prepared; it keeps the whole eval set for training."""
    sets = trainer.eval_dataset
    if not isinstance(sets, dict) or ALL_TASKS not in sets:
        return {}
    sets = dict(sets)
    trainer.eval_dataset = sets.pop(ALL_TASKS)
    return sets


def evaluate_tasks(trainer: Any, task_sets: dict[str, Any]) -> dict[str, Any]:
    """Each task's eval metrics (``eval_<task>_loss``, ...), one prepared set at a time."""
    from transformers import EarlyStoppingCallback

    trainer.remove_callback(EarlyStoppingCallback)  # the run is over; it would miss eval_loss and warn
    combined, found = trainer.eval_dataset, {}
    try:
        for name, subset in task_sets.items():
            trainer.eval_dataset = subset  # evaluate() with no argument: TRL does not prepare it twice
            prefix = f"eval_{name}_"
            for key, value in trainer.evaluate(metric_key_prefix=prefix[:-1]).items():
                # TRL adds its own eval metrics (DPO's rewards/accuracies) as eval_KEY whatever the prefix
                metric = key.removeprefix(prefix) if key.startswith(prefix) else key.removeprefix("eval_")
                if key.startswith("eval_") and metric not in TIMINGS:
                    found[prefix + metric] = value
    finally:
        trainer.eval_dataset = combined
    return found
