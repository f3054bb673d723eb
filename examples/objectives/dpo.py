"""DPO on the real base: does held-out preference accuracy rise far above 0.5?

    python examples/objectives/dpo.py [--base DIR] [--steps 60] [--method lora]

Pairs come from the project's ``json`` task (hub_core/tasks.py): a short question, ``chosen`` is
the answer as ``{"answer": ...}``, ``rejected`` either the same answer as a sentence (a style
preference) or a JSON answer with a wrong value (a correctness preference). Held-out questions
are disjoint from the training ones. Measured before (the fresh adapter, equal to the base) and
after training, on the held-out pairs:

- implied-reward accuracy: share of pairs with beta * (log pi(chosen) - log ref(chosen)) above
  the same for rejected (ties count half; before training every reward is 0, so 0.5);
- the model's own preference: share of pairs where log pi(chosen) > log pi(rejected);
- the share of held-out questions whose greedy answer is a JSON object with an "answer" key.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import real_base, save_results, write_jsonl  # noqa: E402

BETA = 0.1


def pairs(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    from adapterhub.tasks import make_examples

    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    for example in make_examples("json", n * 4, seed=seed):
        question = example["instruction"]
        if question in seen:
            continue
        seen.add(question)
        answer = json.loads(example["output"])["answer"]
        if rng.random() < 0.5:
            rejected = f"The answer is {answer}."
        else:
            wrong = str(int(answer) + rng.choice((-2, -1, 1, 3))) if answer.isdigit() else rng.choice(
                ("Paris", "Berlin", "Rome", "small", "cold", "dark", "Tokyo", "down"))
            rejected = json.dumps({"answer": wrong if wrong != answer else answer + "s"})
        rows.append({"prompt": question, "chosen": example["output"], "rejected": rejected})
        if len(rows) == n:
            break
    return rows


def completion_logps(model, tokenizer, rows: list[dict], key: str) -> list[float]:
    """Sum of log-probs of the answer's tokens after the chat-template prompt (TRL's rendering)."""
    import torch

    from adapterhub.data import render_prompt

    out = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        full = tokenizer(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row[key]}],
                                                       tokenize=False), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        out.append(float(logp[len(prompt) - 1:].sum()))
    return out


def measure(model, base_logps, tokenizer, rows) -> dict:
    from adapterhub.generation import generate_texts

    chosen, rejected = completion_logps(model, tokenizer, rows, "chosen"), completion_logps(model, tokenizer, rows, "rejected")
    rewards = [(BETA * (c - bc), BETA * (r - br)) for c, r, (bc, br) in zip(chosen, rejected, base_logps)]
    implied = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in rewards) / len(rows)
    own = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    answers = generate_texts(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows],
                             max_new_tokens=16)
    json_rate = sum(_is_answer_json(a) for a in answers) / len(rows)
    return {"implied_reward_accuracy": implied, "own_preference_accuracy": own, "json_answer_rate": json_rate,
            "mean_margin": sum(c - r for c, r in rewards) / len(rows), "sample_answers": answers[:3]}


def _is_answer_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict) and "answer" in json.loads(text)
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="/work/bases/smollm2-135m-instruct" if Path(
        "/work/bases/smollm2-135m-instruct").is_dir() else None)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-pairs", type=int, default=160)
    parser.add_argument("--test-pairs", type=int, default=64)
    args = parser.parse_args()

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.cli import main as cli

    base_dir = real_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="dpo-measure-"))
    train_rows = pairs(args.train_pairs, seed=1)
    test_rows = pairs(args.test_pairs, seed=2, exclude={r["prompt"] for r in train_rows})
    data = write_jsonl(work / "prefs.jsonl", train_rows)

    base = load_base(base_dir, "none")
    base_logps = list(zip(completion_logps(base.model, base.tokenizer, test_rows, "chosen"),
                          completion_logps(base.model, base.tokenizer, test_rows, "rejected")))
    before = measure(base.model, base_logps, base.tokenizer, test_rows)  # a fresh adapter is the base
    started = time.perf_counter()
    assert cli(["train", "--plugin", args.method, "--objective", "dpo", "--objective-set", f"beta={BETA}",
                "--base", str(base_dir), "--data", str(data), "--no-publish", "--output", str(work / "adapter"),
                "--max-steps", str(args.steps), "--batch-size", "8", "--lr", "5e-4", "--no-progress"]) == 0
    seconds = time.perf_counter() - started
    _, model = load_adapter(load_base(base_dir, "none").model, work / "adapter")
    after = measure(model, base_logps, base.tokenizer, test_rows)
    save_results("dpo", {
        "base": str(base_dir), "method": args.method, "objective": "dpo", "beta": BETA, "steps": args.steps,
        "train_pairs": len(train_rows), "test_pairs": len(test_rows), "train_seconds": round(seconds, 1),
        "before": before, "after": after,
    })


if __name__ == "__main__":
    main()
