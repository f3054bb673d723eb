"""Multi-task data: several ``--data`` files mixed with weights or a temperature, each task held out
and scored alone, bad mixes refused before the base loads.

The mixing tests read real files with the real objectives; the training tests run real steps on the
tiny base (SFT through the Hugging Face Trainer, DPO through TRL's) and read the published manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from objective_helpers import run, write

from adapterhub.manager import PluginManager
from adapterhub.mixture import parse_sources, read_mixture, share_counts, temperature_probabilities
from adapterhub.tasks import write_split
from adapterhub.training import TrainOptions

SIZES = {"sentiment": 24, "topic": 48, "category": 72}


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """Three synthetic tasks of different sizes, each written as ``<task>.jsonl``."""
    root = tmp_path_factory.mktemp("tasks")
    files = {}
    for task, n in SIZES.items():
        train, _ = write_split(task, root / task, n_train=n, n_test=1)
        files[task] = train.rename(root / f"{task}.jsonl")
    return files


def mixture(files, weights=None, temperature=None, **options):
    sft = PluginManager(autoload=False).get_objective("sft")
    sources = parse_sources([str(files[t]) for t in SIZES], weights, temperature)
    return read_mixture(sft, sources, TrainOptions(**options), temperature)


# -- the mixing ----------------------------------------------------------------------------------


def test_without_weights_the_files_are_concatenated(task_files):
    mixed = mixture(task_files)
    assert Counter(mixed.tasks) == SIZES
    lines = {t: [json.loads(x) for x in task_files[t].read_text().splitlines()] for t in SIZES}
    assert sorted(map(str, mixed.rows)) == sorted(str(m) for t in SIZES for m in _messages(lines[t]))
    assert mixed.lineage["strategy"] == "concat"


def _messages(examples):
    from adapterhub.data import instruction_to_messages

    return [instruction_to_messages(e) for e in examples]


def test_weights_set_each_task_s_share_of_the_examples_drawn(task_files):
    total = sum(SIZES.values())
    mixed = mixture(task_files, weights="1,2,1", seed=7)
    drawn = Counter(mixed.tasks)
    assert sum(drawn.values()) == total  # the mixture keeps the concatenation's size
    for task, weight in zip(SIZES, (1, 2, 1)):
        assert abs(drawn[task] - total * weight / 4) <= 1, drawn
    # sentiment (24 lines, drawn 36 times): one whole pass, then 12 more; category (72) is subsampled
    sentiment = {str(r) for r, t in zip(mixed.rows, mixed.tasks) if t == "sentiment"}
    assert len(sentiment) == len(set(task_files["sentiment"].read_text().splitlines()))  # every line drawn
    category = {str(r) for r, t in zip(mixed.rows, mixed.tasks) if t == "category"}
    other_seed = mixture(task_files, weights="1,2,1", seed=8)
    assert Counter(other_seed.tasks) == drawn  # the seed picks which examples, not how many
    assert category != {str(r) for r, t in zip(other_seed.rows, other_seed.tasks) if t == "category"}
    assert [f["drawn"] for f in mixed.lineage["files"]] == [drawn[t] for t in SIZES]
    assert [f["weight"] for f in mixed.lineage["files"]] == [1.0, 2.0, 1.0]


def test_per_file_weights_default_the_others_to_one(task_files):
    sources = parse_sources([f"{task_files['sentiment']}:weight=3,name=sent", str(task_files["topic"])])
    assert [(s.name, s.weight) for s in sources] == [("sent", 3.0), ("topic", 1.0)]
    sources = parse_sources([{"path": str(task_files["topic"]), "weight": 0.5, "name": "t"}])
    assert [(s.name, s.weight) for s in sources] == [("t", 0.5)]


def test_temperature_follows_t5_s_formula(task_files):
    assert temperature_probabilities([100, 400], 1.0) == pytest.approx([0.2, 0.8])
    assert temperature_probabilities([100, 400], 2.0) == pytest.approx([1 / 3, 2 / 3])  # sqrt: 10 vs 20
    assert temperature_probabilities([100, 400], 1e9) == pytest.approx([0.5, 0.5])
    assert share_counts([1 / 3, 1 / 3, 1 / 3], 10) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    mixed = mixture(task_files, temperature=3, eval_split=0.25)
    train_sizes = [f["examples"] for f in mixed.lineage["files"]]
    assert train_sizes == [n - round(n * 0.25) for n in SIZES.values()]
    expected = temperature_probabilities(train_sizes, 3.0)
    assert [f["probability"] for f in mixed.lineage["files"]] == pytest.approx(expected, abs=1e-6)
    assert Counter(mixed.tasks) == dict(zip(SIZES, share_counts(expected, sum(train_sizes))))
    assert {t: len(rows) for t, rows in mixed.eval_tasks.items()} == {t: round(n * 0.25) for t, n in SIZES.items()}


# -- refusals, before the base loads -------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, task_files) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    pairs = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    (root / "elsewhere").mkdir()
    same_stem = root / "elsewhere" / "sentiment.jsonl"
    same_stem.write_bytes(task_files["sentiment"].read_bytes())
    return {"pairs": write(root / "pairs.jsonl", pairs), "copy": same_stem,
            "keywords": write(root / "keywords.jsonl", [{"prompt": f"say {w}", "keyword": w} for w in "abc"]),
            "labels": write(root / "labels.jsonl", [{"prompt": f"label {w}", "label": w} for w in "abc"]),
            "badline": write(root / "badline.jsonl", [{"instruction": "a", "output": "b"},
                                                      {"instruction": "a", "output": ""}])}


@pytest.mark.parametrize("extra, data, expected", [
    (["--data-weights", "1,-2"], ("sentiment", "topic"), ["topic.jsonl", "must be a finite number >= 0"]),
    (["--data-weights", "0,0"], ("sentiment", "topic"), ["every --data weight is 0", "positive weight"]),
    (["--data-weights", "1,2,3"], ("sentiment", "topic"), ["3 value(s) for 2 --data file(s)", "one weight per file"]),
    (["--data-weights", "1,heavy"], ("sentiment", "topic"), ["topic.jsonl", "'heavy' is not a number"]),
    ([], ("sentiment", "missing"), ["missing.jsonl: file not found"]),
    ([], ("sentiment", "pairs"), ["pairs.jsonl holds preference pairs", "--objective dpo"]),
    ([], ("sentiment", "badline"), ["badline.jsonl:2: 'output' is empty"]),  # its own shape: the line's error
    ([], ("sentiment", "copy"), ["are both task 'sentiment'", ":name=OTHER"]),
    (["--data-temperature", "2", "--data-weights", "1,1"], ("sentiment", "topic"), ["exclusive"]),
    (["--data-temperature", "0"], ("sentiment", "topic"), ["must be a number > 0"]),
    ([], ("sentiment:weight=x", "topic"), ["'x' is not a number"]),
    ([], ("sentiment:weigth=2", "topic"), ["'weigth=2' is not one of weight=W, name=N"]),
    (["--objective", "grpo", "--objective-set", "reward=max_words"], ("keywords", "labels"),
     ["labels.jsonl has other columns than", "only here: label; missing here: keyword", "same columns"]),
], ids=["negative", "zero-sum", "count", "not-a-number", "unknown-file", "mixed-shapes", "bad-line", "same-name",
        "temperature-and-weights", "bad-temperature", "bad-file-weight", "misspelt-key", "other-columns"])
def test_bad_mixtures_are_refused_before_the_base_loads(tmp_path, task_files, odd_files, extra, data, expected):
    paths = {**{t: str(p) for t, p in task_files.items()}, **{k: str(p) for k, p in odd_files.items()},
             "missing": str(tmp_path / "missing.jsonl")}
    args = []
    for spec in data:
        name, _, tail = spec.partition(":")
        args += ["--data", paths[name] + (f":{tail}" if tail else "")]
    never = tmp_path / "no-base-here"  # loading it would fail with an error about the base instead
    code, _, err = run("train", "--plugin", "lora", "--base", str(never), "--no-publish", "--output",
                       str(tmp_path / "out"), *args, *extra)
    assert code != 0 and err.startswith("error: "), err
    for text in expected:
        assert text in err, err
    assert "no-base-here" not in err and not (tmp_path / "out").exists()


# -- real training ------------------------------------------------------------------------------


def test_yaml_mixture_trains_and_publishes_per_task_eval_loss(tmp_path, tiny_base_dir, task_files):
    registry = tmp_path / "registry"
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"plugin: lora\nbase: {tiny_base_dir}\ntask: multi\nregistry: {registry}\n"
        f"data:\n  - {task_files['sentiment']}\n  - path: {task_files['topic']}\n    weight: 3\n    name: topics\n"
        "eval_split: 0.25\nmax_steps: 3\nbatch_size: 4\nprogress: false\nseed: 0\n")
    code, out, err = run("train", "--config", str(config))
    assert code == 0, err
    from adapterhub.registry import open_registry

    published = open_registry(str(registry)).manifest(out.strip().splitlines()[-1])
    metrics, training = published.metrics, published.training
    for task in ("sentiment", "topics"):
        assert metrics[f"eval_{task}_loss"] > 0
        assert f"eval_{task}_runtime" not in metrics
    assert metrics["eval_loss"] > 0 and metrics["global_step"] == 3
    n_eval = {"sentiment": round(24 * 0.25), "topics": round(48 * 0.25)}
    # the whole eval set's loss is the example-weighted mean of the tasks' (each example one batch row)
    assert metrics["eval_loss"] == pytest.approx(
        sum(metrics[f"eval_{t}_loss"] * n for t, n in n_eval.items()) / sum(n_eval.values()), rel=0.05)
    files = training["data_mixture"]["files"]
    assert [(f["name"], f["weight"]) for f in files] == [("sentiment", 1.0), ("topics", 3.0)]
    for f, task in zip(files, ("sentiment", "topic")):
        assert f["sha256"] == hashlib.sha256(task_files[task].read_bytes()).hexdigest()
    assert training["data"] == [str(task_files["sentiment"]), str(task_files["topic"])]
    assert training["examples"] == sum(f["drawn"] for f in files) == 18 + 36
    assert training["eval_examples"] == sum(n_eval.values())


def test_flags_replace_the_yaml_data_and_a_single_file_stays_as_before(tmp_path, tiny_base_dir, task_files):
    config = tmp_path / "mix.yaml"
    config.write_text(f"data:\n  - {task_files['sentiment']}\n  - {task_files['topic']}\ndata_weights: [1, 2]\n")
    out = tmp_path / "adapter"
    code, _, err = run("train", "--config", str(config), "--plugin", "lora", "--base", str(tiny_base_dir),
                       "--data", str(task_files["category"]), "--data-weights", "1", "--no-publish", "--output",
                       str(out), "--max-steps", "1", "--batch-size", "4", "--no-progress")
    assert code == 0, err
    training = json.loads((out / "adapterhub.json").read_text())["training"]
    assert training["data"] == str(task_files["category"]) and "data_mixture" not in training
    assert training["data_sha256"] == hashlib.sha256(task_files["category"].read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pairs")
    files = []
    for task, (good, bad) in {"mood": ("happy", "sad"), "weather": ("sunny", "rainy")}.items():
        rows = [{"prompt": f"{task} {i}?", "chosen": good, "rejected": bad} for i in range(8)]
        files.append(write(root / f"{task}.jsonl", rows))
    return files


def test_a_trl_objective_reports_each_task_too(tmp_path, tiny_base_dir, pair_files):
    out = tmp_path / "adapter"
    code, _, err = run("train", "--plugin", "lora", "--objective", "dpo", "--base", str(tiny_base_dir),
                       "--data", str(pair_files[0]), "--data", str(pair_files[1]), "--data-temperature", "2",
                       "--eval-split", "0.25", "--no-publish", "--output", str(out), "--max-steps", "2",
                       "--batch-size", "2", "--no-progress")
    assert code == 0, err
    meta = json.loads((out / "adapterhub.json").read_text())
    for task in ("mood", "weather"):
        assert meta["metrics"][f"eval_{task}_loss"] > 0
        assert f"eval_{task}_rewards/accuracies" in meta["metrics"]  # DPO's own eval metrics, per task
    margins = [meta["metrics"][f"eval_{task}_rewards/margins"] for task in ("mood", "weather")]
    # the whole eval set's own metrics stay its own (two tasks, two examples each, one batch each)
    assert meta["metrics"]["eval_rewards/margins"] == pytest.approx(sum(margins) / 2, rel=1e-3)
    assert meta["training"]["data_mixture"]["strategy"] == "temperature"
