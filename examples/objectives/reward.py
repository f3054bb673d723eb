"""Reward model on the real base: does held-out ranking accuracy rise far above chance?

    python examples/objectives/reward.py [--base DIR] [--steps 90] [--method lora]

Preference pairs of three kinds, generated deterministically from :mod:`adapterhub.tasks`:

- ``json_style``: a short question; chosen ``{"answer": ...}``, rejected the same answer as a sentence;
- ``json_value``: chosen the right ``{"answer": ...}``, rejected a JSON answer with a wrong value;
- ``sentiment``: chosen the right label, rejected the other one.

Held-out prompts are disjoint from the training ones. Ranking accuracy (the share of held-out pairs
whose chosen answer scores above the rejected one) is measured before training (a fresh score head
and a fresh adapter: chance, whatever the random head happens to prefer) and after, with
``RewardModel`` on the saved adapter (what ``adapterhub score`` and ``grpo``'s
``reward=adapter:TASK@N`` use).
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

DEFAULT_BASE = "/work/bases/smollm2-135m-instruct"
KINDS = ("json_style", "json_value", "sentiment")


def wrong_value(answer: str, rng: random.Random) -> str:
    from adapterhub.tasks import CAPITALS, OPPOSITES

    if answer.isdigit():
        return str(int(answer) + rng.choice((-3, -2, -1, 1, 2, 4)))
    pool = sorted(set(CAPITALS.values()) if answer in CAPITALS.values() else set(OPPOSITES.values()) | set(OPPOSITES))
    return rng.choice([w for w in pool if w != answer])


def pairs(kind: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` pairs of one kind whose prompts are not in ``exclude``."""
    from adapterhub.tasks import make_examples

    rng = random.Random(f"{kind}:{seed}")
    rows, seen = [], set(exclude)
    for example in make_examples("sentiment" if kind == "sentiment" else "json", n * 8, seed=seed):
        prompt = example["instruction"] + "\n\n" + example.get("input", "")
        if prompt in seen:
            continue
        seen.add(prompt)
        if kind == "sentiment":
            label = example["output"]
            row = {"chosen": label, "rejected": "negative" if label == "positive" else "positive"}
        else:
            answer = json.loads(example["output"])["answer"]
            rejected = (f"The answer is {answer}." if kind == "json_style"
                        else json.dumps({"answer": wrong_value(answer, rng)}))
            row = {"chosen": example["output"], "rejected": rejected}
        rows.append({"instruction": example["instruction"], **({"input": example["input"]} if "input" in example
                                                                 else {}), **row, "kind": kind})
        if len(rows) == n:
            break
    return rows


def ranking(scores_chosen: list[float], scores_rejected: list[float], rows: list[dict]) -> dict:
    wins = [c > r for c, r in zip(scores_chosen, scores_rejected)]
    result = {"all": sum(wins) / len(wins)}
    for kind in KINDS:
        mine = [w for w, row in zip(wins, rows) if row["kind"] == kind]
        result[kind] = sum(mine) / len(mine)
    result["mean_margin"] = sum(c - r for c, r in zip(scores_chosen, scores_rejected)) / len(rows)
    return result


def score_pairs(score, rows: list[dict]) -> dict:
    from adapterhub.objectives.shapes import prompt_turns

    prompts = [prompt_turns(r, "row") for r in rows]
    chosen = score(prompts, [r["chosen"] for r in rows])
    rejected = score(prompts, [r["rejected"] for r in rows])
    return ranking(chosen, rejected, rows)


def untrained(base_dir: Path, method_name: str, seed: int):
    """A scorer for the fresh head + fresh adapter training starts from (the same seed)."""
    from adapterhub.base import load_base
    from adapterhub.manager import get_manager
    from adapterhub.objectives.scoring import head_apart, init_head, ready_for_methods, render, rewards
    from adapterhub.training import seed_everything

    base = load_base(base_dir, "none", head="sequence-classification")
    seed_everything(seed)  # then the head and the adapter, as `adapterhub train --seed` draws them
    init_head(base.model)
    method = get_manager().get_method(method_name)
    with head_apart(ready_for_methods(base.model)):
        model = method.attach(base.model, method.make_config({}))
    model.eval()
    tok = base.tokenizer
    return lambda prompts, answers: rewards(model, tok.pad_token_id,
                                            [render(tok, p, a) for p, a in zip(prompts, answers)], 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=DEFAULT_BASE if Path(DEFAULT_BASE).is_dir() else None)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-pairs", type=int, default=80, help="per kind")
    parser.add_argument("--test-pairs", type=int, default=32, help="per kind")
    args = parser.parse_args()

    from adapterhub.cli import main as cli
    from adapterhub.objectives.scoring import RewardModel

    base_dir = real_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="reward-measure-"))
    train_rows, test_rows = [], []
    for i, kind in enumerate(KINDS):
        train_kind = pairs(kind, args.train_pairs, seed=10 + i)
        seen = {r["instruction"] + "\n\n" + r.get("input", "") for r in train_kind}
        train_rows += train_kind
        test_rows += pairs(kind, args.test_pairs, seed=20 + i, exclude=seen)
    random.Random(0).shuffle(train_rows)
    data = write_jsonl(work / "pairs.jsonl", [{k: v for k, v in r.items() if k != "kind"} for r in train_rows])

    before = score_pairs(untrained(base_dir, args.method, seed=0), test_rows)
    print("before:", before, flush=True)
    started = time.perf_counter()
    assert cli(["train", "--plugin", args.method, "--objective", "reward", "--base", str(base_dir), "--data", str(data),
                "--no-publish", "--output", str(work / "adapter"), "--max-steps", str(args.steps), "--batch-size", "8",
                "--lr", str(args.lr), "--warmup-steps", "5", "--seed", "0", "--no-progress"]) == 0
    seconds = time.perf_counter() - started
    reward_model = RewardModel.load(str(work / "adapter"), base=str(base_dir))
    after = score_pairs(reward_model.score, test_rows)
    train_after = score_pairs(reward_model.score, train_rows[:96])
    metrics = json.loads((work / "adapter" / "adapterhub.json").read_text())["metrics"]
    save_results("reward", {
        "base": str(base_dir), "method": args.method, "objective": "reward", "steps": args.steps, "lr": args.lr,
        "batch_size": 8, "train_pairs": len(train_rows), "test_pairs": len(test_rows),
        "train_seconds": round(seconds, 1), "train_loss": metrics.get("train_loss"),
        "held_out_ranking_accuracy": {"before": before, "after": after},
        "train_ranking_accuracy_after_first_96": train_after,
    })


if __name__ == "__main__":
    main()
