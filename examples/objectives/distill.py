"""Distillation on the real base: does a student adapter come closer to its teacher?

    python examples/objectives/distill.py [--base DIR] [--teacher-steps 60] [--steps 60]

The teacher is a LoRA trained here by SFT on the project's ``json`` task (hub_core/tasks.py: a
short question answered as ``{"answer": ...}``, a style SmolLM2-135M-Instruct never uses on its
own). A fresh student LoRA is then distilled from it (``--objective distill``, forward KL, the
student's own sampled answers) on the training QUESTIONS only: it never sees an answer, only the
teacher's distributions. Measured on held-out questions, before (the student is the base) and
after:

- the mean per-token KL(teacher || student) along the teacher's greedy answers;
- exact match of the student's greedy answer against the teacher's greedy answer;
- the share of greedy answers that are a JSON object with an "answer" key (the teacher's style).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import real_base, save_results, write_jsonl  # noqa: E402

ANSWER_TOKENS = 16  # a JSON answer with its end-of-turn token fits


def questions(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """SFT examples for the teacher and held-out ones whose questions it never saw."""
    from adapterhub.tasks import make_examples

    train, test, seen = [], [], set()
    for example in make_examples("json", (n_train + n_test) * 4, seed=0):
        if example["instruction"] in seen:
            continue
        seen.add(example["instruction"])
        (train if len(train) < n_train else test).append(example)
        if len(test) == n_test:
            break
    return train, test


def measure(student, teacher, tokenizer, test: list[dict], teacher_answers: list[str]) -> dict:
    from adapterhub.generation import generate_texts
    from adapterhub.objectives.distill import teacher_kl

    conversations = [[{"role": "user", "content": e["instruction"]}] for e in test]
    answers = generate_texts(student, tokenizer, conversations, max_new_tokens=ANSWER_TOKENS)
    return {
        "kl_per_token": round(teacher_kl(teacher, student, tokenizer, conversations, max_new_tokens=ANSWER_TOKENS), 4),
        "exact_match_vs_teacher": sum(a == t for a, t in zip(answers, teacher_answers)) / len(test),
        "json_answer_rate": sum(map(is_answer_json, answers)) / len(test),
        "sample_answers": answers[:3],
    }


def is_answer_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict) and "answer" in json.loads(text)
    except ValueError:
        return False


def train(*argv: str) -> float:
    from adapterhub.cli import main as cli

    started = time.perf_counter()
    assert cli(["train", "--plugin", "lora", "--no-publish", "--batch-size", "8", "--no-progress", *argv]) == 0
    return round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="/work/bases/smollm2-135m-instruct" if Path(
        "/work/bases/smollm2-135m-instruct").is_dir() else None)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60, help="distillation steps")
    parser.add_argument("--train", type=int, default=160, help="training questions")
    parser.add_argument("--test", type=int, default=40, help="held-out questions")
    args = parser.parse_args()

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.generation import generate_texts
    from adapterhub.objectives.distill import load_teacher, resolve_teacher

    base_dir = real_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="distill-measure-"))
    train_rows, test_rows = questions(args.train, args.test)
    sft = write_jsonl(work / "sft.jsonl", train_rows)
    prompts = write_jsonl(work / "prompts.jsonl", [{"instruction": e["instruction"]} for e in train_rows])

    teacher_seconds = train("--base", str(base_dir), "--data", str(sft), "--output", str(work / "teacher"),
                            "--max-steps", str(args.teacher_steps))
    base = load_base(base_dir, "none")
    teacher = load_teacher(resolve_teacher(str(work / "teacher")), base)
    conversations = [[{"role": "user", "content": e["instruction"]}] for e in test_rows]
    teacher_answers = generate_texts(teacher, base.tokenizer, conversations, max_new_tokens=ANSWER_TOKENS)
    teacher_em = sum(a == e["output"] for a, e in zip(teacher_answers, test_rows)) / len(test_rows)
    before = measure(base.model, teacher, base.tokenizer, test_rows, teacher_answers)

    seconds = train("--objective", "distill", "--objective-set", f"teacher={work / 'teacher'}",
                    "--objective-set", f"max_completion_length={ANSWER_TOKENS}", "--base", str(base_dir),
                    "--data", str(prompts), "--output", str(work / "student"), "--max-steps", str(args.steps))
    _, student = load_adapter(load_base(base_dir, "none").model, work / "student")
    after = measure(student, teacher, base.tokenizer, test_rows, teacher_answers)
    metrics = json.loads((work / "student" / "adapterhub.json").read_text())["metrics"]
    save_results("distill", {
        "base": str(base_dir), "method": "lora", "objective": "distill", "task": "json",
        "divergence": "forward KL (beta=0), on-policy", "teacher_steps": args.teacher_steps, "steps": args.steps,
        "train_questions": len(train_rows), "test_questions": len(test_rows),
        "teacher_train_seconds": teacher_seconds, "distill_train_seconds": seconds,
        "teacher": {"exact_match_vs_reference": teacher_em, "json_answer_rate":
                    sum(map(is_answer_json, teacher_answers)) / len(test_rows), "sample_answers": teacher_answers[:3]},
        "training_divergence": {k: round(metrics[k], 4) for k in ("divergence_first_logged", "divergence_last_logged")
                                if k in metrics},
        "before": before, "after": after,
    })


if __name__ == "__main__":
    main()
