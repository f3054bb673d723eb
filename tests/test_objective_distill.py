"""The ``distill`` objective on the tiny base: a student LoRA learns a teacher's distributions.

The teacher is a real SFT LoRA trained here first; the student is distilled from it through the
CLI, published to a temp registry and loaded back like any LoRA. "Closer" is measured as the
mean per-token KL(teacher || student) along the teacher's greedy answers to held-out prompts.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from adapterhub.cli import main

STEPS = ["--max-steps", "10", "--batch-size", "8", "--lr", "5e-3", "--no-progress", "--seed", "0"]
ANSWER_TOKENS = 8


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def prompt_lines(path: Path) -> list[dict]:
    """The instruction and input of SFT lines, without their answers: what distillation reads."""
    return [{"instruction": e["instruction"], "input": e["input"]} for e in map(json.loads, path.read_text().splitlines())]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir, sentiment_data):
    """A registry holding the teacher (an SFT LoRA, ``teacher@1``) and a prompts file."""
    root = tmp_path_factory.mktemp("distill")
    registry = root / "registry"
    code, out, err = run("train", "--plugin", "lora", "--base", str(tiny_base_dir), "--data", str(sentiment_data[0]),
                         "--task", "teacher", "--registry", str(registry), "--max-steps", "20", "--batch-size", "8",
                         "--lr", "3e-3", "--no-progress", "--seed", "0")
    assert code == 0, err
    prompts = write(root / "prompts.jsonl", prompt_lines(Path(sentiment_data[0]))[:96])
    return {"root": root, "registry": registry, "prompts": prompts}


def distill(base: Path, world: dict, task: str, teacher: str, *extra: str) -> tuple[int, str, str]:
    return run("train", "--plugin", "lora", "--objective", "distill", "--objective-set", f"teacher={teacher}",
               "--objective-set", f"max_completion_length={ANSWER_TOKENS}", "--base", str(base), "--data",
               str(world["prompts"]), "--task", task, "--registry", str(world["registry"]), *STEPS, *extra)


def held_out(sentiment_data) -> list[list[dict]]:
    return [[{"role": "user", "content": f"{e['instruction']}\n\n{e['input']}"}]
            for e in prompt_lines(Path(sentiment_data[1]))[:12]]


def manifest(world: dict, ref: str):
    from adapterhub.registry import open_registry

    return open_registry(str(world["registry"])).manifest(ref)


# -- learning ------------------------------------------------------------------------------------


def test_distillation_brings_the_student_closer_and_publishes_a_loadable_lora_naming_its_teacher(
        tiny_base_dir, sentiment_data, world):
    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.objectives.distill import load_teacher, resolve_teacher, teacher_kl
    from adapterhub.adapters import resolve_adapter_dir

    code, out, err = distill(tiny_base_dir, world, "student", "teacher@latest", "--eval-split", "0.1")
    assert code == 0, err
    ref = out.strip().splitlines()[-1]
    assert ref == "student@1"

    base = load_base(tiny_base_dir, "none")
    teacher = load_teacher(resolve_teacher("teacher@1", str(world["registry"])), base)
    prompts = held_out(sentiment_data)
    before = teacher_kl(teacher, base.model, base.tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
    directory, _ = resolve_adapter_dir(ref, str(world["registry"]))
    method, student = load_adapter(load_base(tiny_base_dir, "none").model, directory, base_fingerprint=base.fingerprint)
    after = teacher_kl(teacher, student, base.tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
    assert method.name == "lora"
    assert before > 0.5 and after < 0.75 * before, (before, after)

    m = manifest(world, ref)
    objective = m.training["objective"]
    assert objective["name"] == "distill" and objective["config"]["teacher"] == "teacher@latest"
    assert objective["teacher"] == {"kind": "adapter", "ref": "teacher@1", "method": "lora",
                                    "base_fingerprint": base.fingerprint}
    assert objective["divergence"] == "forward KL(teacher || student)"
    assert "eval_loss" in m.metrics and m.metrics["divergence_last_logged"] < m.metrics["divergence_first_logged"]


def test_a_full_model_teacher_sharing_the_tokenizer_is_distilled_and_recorded_by_fingerprint(
        tiny_base_dir, world):
    from adapterhub.base import fingerprint
    from adapterhub.pipeline import merge_to_directory

    merged = merge_to_directory("teacher@1", str(tiny_base_dir), str(world["root"] / "merged"),
                                registry=str(world["registry"]))
    code, out, err = distill(tiny_base_dir, world, "from-model", f"model:{merged}", "--max-steps", "2")
    assert code == 0, err
    teacher = manifest(world, out.strip().splitlines()[-1]).training["objective"]["teacher"]
    assert teacher == {"kind": "model", "model": str(merged), "directory": str(merged),
                       "fingerprint": fingerprint(merged)}


# -- refusals ------------------------------------------------------------------------------------


def test_a_teacher_adapter_from_another_base_is_refused_naming_both(tiny_base_dir, sentiment_data, world, tmp_path):
    import torch

    from adapterhub.base import load_base

    other = load_base(tiny_base_dir, "none")
    with torch.no_grad():
        other.model.lm_head.weight.mul_(1.5)
    other.model.save_pretrained(tmp_path / "other-base")
    other.tokenizer.save_pretrained(tmp_path / "other-base")
    code, _, err = run("train", "--plugin", "lora", "--base", str(tmp_path / "other-base"), "--data",
                       str(sentiment_data[0]), "--no-publish", "--output", str(tmp_path / "foreign"), "--max-steps", "1",
                       "--no-progress")
    assert code == 0, err
    code, _, err = distill(tiny_base_dir, world, "refused", str(tmp_path / "foreign"))
    assert code == 2
    assert f"teacher={tmp_path / 'foreign'}" in err and "was trained on base" in err and "model:DIR" in err, err


def test_a_teacher_model_with_another_tokenizer_is_refused_naming_both(tiny_base_dir, world, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_base_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<teacher-only>"])
    tokenizer.save_pretrained(other)
    code, _, err = distill(tiny_base_dir, world, "refused", f"model:{other}")
    assert code == 2
    assert f"its tokenizer ({other}" in err and f"student base's ({tiny_base_dir}" in err, err
    assert "'<teacher-only>'" in err and "same model family" in err, err


@pytest.mark.parametrize("teacher, message", [
    ("nope@1", "teacher=nope@1: "),
    ("", "distill needs a teacher: --objective-set teacher=SPEC"),
    ("model:/no/such/model", "teacher=model:/no/such/model: base model '/no/such/model' not found"),
])
def test_a_teacher_that_does_not_resolve_is_refused_before_the_base_loads(world, tmp_path, teacher, message):
    missing_base = tmp_path / "no-base-here"  # the teacher is checked first: the base is never looked at
    code, _, err = distill(missing_base, world, "refused", teacher)
    assert code == 2 and message in err, err


def test_a_model_directory_given_as_an_adapter_says_to_write_model(tiny_base_dir, world):
    code, _, err = distill(tiny_base_dir, world, "refused", str(tiny_base_dir))
    assert code == 2 and f"teacher=model:{tiny_base_dir}" in err, err


def test_a_bad_prompt_line_names_file_and_line(world, tmp_path):
    data = write(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": "fine"}, {"answer": "no prompt"}])
    code, _, err = run("train", "--plugin", "lora", "--objective", "distill", "--objective-set", "teacher=teacher@1",
                       "--base", str(tmp_path / "no-base-here"), "--data", str(data), "--task", "t",
                       "--registry", str(world["registry"]))
    assert code == 2 and f"{data}:3: give the prompt as exactly one of" in err, err


def test_config_ranges_are_checked():
    from adapterhub.errors import ConfigError
    from adapterhub.manager import PluginManager

    distill_objective = PluginManager(autoload=False).get_objective("distill")
    with pytest.raises(ConfigError, match=r"beta=1.5 must be in \[0, 1\]"):
        distill_objective.make_config({"beta": "1.5"})
    with pytest.raises(ConfigError, match="temperature=0.0 must be > 0"):
        distill_objective.make_config({"temperature": "0"})
    assert distill_objective.make_config({}).beta == 0.0  # forward KL unless asked otherwise
