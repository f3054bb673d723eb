"""Every method x every objective x {full precision, nf4} on the tiny base: two real training steps.

``make test`` runs a covering part (every method under DPO, a TRL objective, in both precisions; every
objective with the bottleneck adapter, the method with its own training context, on nf4): about 3 s a
run on two cores. The whole matrix is ``-m slow`` (208 runs, about 10 minutes).

Each combination either trains (exit 0) or is refused before the base loads with one ``error:`` line
(exit 2; the base's loading would print its progress), never a traceback: the one training path asks the method for its adapter and training context whatever the
objective, so a method's own needs (the bottleneck adapter on a quantized base) hold for DPO as for SFT.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from objective_helpers import run, write

from adapterhub.manager import PluginManager

WORDS = {"positive": ("good", "great"), "negative": ("bad", "sad")}


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label, other = ("positive", "negative") if i % 2 else ("negative", "positive")
        rows.append({"instruction": "sentiment?", "input": f"a {WORDS[label][(i // 2) % 2]} day {i}",
                     "label": label, "other": other})
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir) -> dict:
    """The data each objective reads, and a teacher LoRA for ``distill``."""
    root = tmp_path_factory.mktemp("matrix")
    rows = _rows(8)
    data = {
        "sft": write(root / "sft.jsonl", [{"instruction": r["instruction"], "input": r["input"], "output": r["label"]}
                                          for r in rows]),
        "pairs": write(root / "pairs.jsonl", [{"instruction": r["instruction"], "input": r["input"],
                                               "chosen": r["label"], "rejected": r["other"]} for r in rows]),
        "kto": write(root / "kto.jsonl", [{"prompt": r["input"], "completion": r["label"] if i % 2 else r["other"],
                                           "label": bool(i % 2)} for i, r in enumerate(rows)]),
        "prompts": write(root / "prompts.jsonl", [{"prompt": r["input"]} for r in rows]),
    }
    registry = root / "registry"
    code, _, err = run("train", "--plugin", "lora", "--base", str(tiny_base_dir), "--data", str(data["sft"]),
                       "--task", "teacher", "--registry", str(registry), "--max-steps", "2", "--no-progress")
    assert code == 0, err
    return {"data": data, "registry": registry}


# what each objective reads, and the settings that keep two steps small
OBJECTIVE_ARGS = {
    "sft": ("sft", ()),
    "dpo": ("pairs", ()),
    "orpo": ("pairs", ()),
    "simpo": ("pairs", ()),
    "kto": ("kto", ()),
    "reward": ("pairs", ()),
    "grpo": ("prompts", ("--objective-set", "reward=max_words", "--objective-set", "num_generations=2",
                         "--objective-set", "max_completion_length=4")),
    "distill": ("prompts", ("--objective-set", "teacher=teacher@1", "--objective-set", "max_completion_length=4")),
}


def _methods() -> list[str]:
    return sorted(PluginManager(autoload=False).methods())


def _objectives() -> list[str]:
    return sorted(PluginManager(autoload=False).objectives())


def test_the_matrix_names_every_registered_objective():
    assert sorted(OBJECTIVE_ARGS) == _objectives()


def _matrix() -> list:
    cases = []
    for method in _methods():
        for objective in _objectives():
            for quantize in ("none", "nf4"):
                core = objective == "dpo" or (method == "adapter" and quantize == "nf4")
                marks = () if core else (pytest.mark.slow,)
                cases.append(pytest.param(method, objective, quantize, marks=marks,
                                          id=f"{method}-{objective}-{quantize}"))
    return cases


@pytest.mark.parametrize(("method", "objective", "quantize"), _matrix())
def test_trains_or_refuses_in_one_line(world, tiny_base_dir, tmp_path, method, objective, quantize):
    shape, extra = OBJECTIVE_ARGS[objective]
    code, out, err = run("train", "--plugin", method, "--objective", objective, "--quantize", quantize,
                         "--base", str(tiny_base_dir), "--data", str(world["data"][shape]), "--registry",
                         str(world["registry"]), "--output", str(tmp_path / "out"), "--no-publish", "--max-steps", "2",
                         "--batch-size", "2", "--no-progress", "--seed", "0", *extra)
    assert "Traceback" not in err, err
    print(f"matrix: {method} {objective} {quantize}: {'works' if code == 0 else 'refused'}")  # counted with -s
    if code == 0:
        assert (tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir())
        return
    lines = [line for line in err.splitlines() if line.strip()]
    # refused before the base loads: transformers' weight-loading progress never started
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
