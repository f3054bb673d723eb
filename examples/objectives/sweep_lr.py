"""A small learning-rate sweep of a preference objective on the real base: which lr to recommend?

    python examples/objectives/sweep_lr.py [--objective dpo] [--lrs 1e-3,2e-4,5e-5] [--steps 12]

The data and measurements are dpo.py's (the project's ``json`` task: held-out implied-reward
accuracy, the model's own preference, the JSON-answer rate and three sample answers); ``kto`` trains
on the same pairs split into unpaired rows (chosen: ``label`` true, rejected: false). Every lr gets
the same data, steps, seed and the method's other recommended options, so only the lr differs. An lr
is good when preference accuracy rises AND the answers stay sane (JSON-answer rate not falling below
the base's, sample answers readable): a high margin with garbage answers is the failure to avoid.

Writes ``bench/results/objectives/sweep_lr_<objective>.json``. One seed and few steps: a coarse
choice between orders of magnitude, not a tuned value.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import real_base, save_results, write_jsonl  # noqa: E402
from dpo import BETA, completion_logps, measure, pairs  # noqa: E402


def training_rows(objective: str, rows: list[dict]) -> list[dict]:
    if objective == "kto":
        return [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                for r in rows for key in ("chosen", "rejected")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None)
    parser.add_argument("--objective", default="dpo", choices=("dpo", "kto"))
    parser.add_argument("--method", default="lora")
    parser.add_argument("--lrs", default="1e-3,2e-4,5e-5")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--train-pairs", type=int, default=96)
    parser.add_argument("--test-pairs", type=int, default=24)
    args = parser.parse_args()

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.cli import main as cli

    base_dir = real_base(args.base)
    work = Path(tempfile.mkdtemp(prefix=f"sweep-{args.objective}-"))
    train_rows = pairs(args.train_pairs, seed=1)
    test_rows = pairs(args.test_pairs, seed=2, exclude={r["prompt"] for r in train_rows})
    data = write_jsonl(work / "train.jsonl", training_rows(args.objective, train_rows))

    base = load_base(base_dir, "none")
    base_logps = list(zip(completion_logps(base.model, base.tokenizer, test_rows, "chosen"),
                          completion_logps(base.model, base.tokenizer, test_rows, "rejected")))
    before = measure(base.model, base_logps, base.tokenizer, test_rows)
    print(f"base: {before}", flush=True)
    runs = []
    for lr in args.lrs.split(","):
        out = work / f"adapter-{lr}"
        started = time.perf_counter()
        assert cli(["train", "--plugin", args.method, "--objective", args.objective, "--objective-set",
                    f"beta={BETA}", "--base", str(base_dir), "--data", str(data), "--no-publish", "--output", str(out),
                    "--max-steps", str(args.steps), "--batch-size", "8", "--lr", lr, "--seed", "0",
                    "--no-progress"]) == 0
        seconds = time.perf_counter() - started
        _, model = load_adapter(load_base(base_dir, "none").model, out)
        after = measure(model, base_logps, base.tokenizer, test_rows)
        runs.append({"lr": float(lr), "train_seconds": round(seconds, 1), "after": after})
        print(f"lr {lr}: {after} ({seconds:.0f} s)", flush=True)
    save_results(f"sweep_lr_{args.objective}", {
        "base": str(base_dir), "method": args.method, "objective": args.objective, "beta": BETA,
        "steps": args.steps, "batch_size": 8, "seed": 0, "train_pairs": len(train_rows), "test_pairs": len(test_rows),
        "before": before, "runs": runs,
    })


if __name__ == "__main__":
    main()
