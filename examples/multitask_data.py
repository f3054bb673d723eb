"""Data for a multi-task run: three synthetic tasks of adapterhub.tasks, one JSONL file each.

    python examples/multitask_data.py OUT_DIR [--train sentiment=240,topic=80,category=40] [--test 50] [--seed 0]

Writes ``OUT_DIR/<task>.jsonl`` (training; the file stem is the task's name in the metrics) and
``OUT_DIR/<task>.test.jsonl`` (held-out examples no training prompt repeats, for exact match), and
prints the commands that train one LoRA on all three at once and one per task. The default sizes
are unequal on purpose, so mixing by weights or temperature differs from plain concatenation.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

TASKS = ("sentiment", "topic", "category")
DEFAULT_TRAIN = "sentiment=240,topic=80,category=40"


def parse_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        task, _, n = part.partition("=")
        if task.strip() not in TASKS or not n.strip().isdigit() or int(n) < 2:
            raise SystemExit(f"--train {text!r}: write TASK=N pairs (N >= 2) for tasks among {', '.join(TASKS)}")
        sizes[task.strip()] = int(n)
    return sizes


def write_tasks(out: Path, sizes: dict[str, int], n_test: int, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """``{task: (train file, test file)}`` under ``out``, from :func:`adapterhub.tasks.write_split`."""
    from adapterhub.tasks import write_split

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, n_train in sizes.items():
            train, test = write_split(task, Path(tmp) / task, n_train=n_train, n_test=n_test, seed=seed)
            written[task] = (out / f"{task}.jsonl", out / f"{task}.test.jsonl")
            shutil.move(train, written[task][0])
            shutil.move(test, written[task][1])
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory to write the files into")
    parser.add_argument("--train", default=DEFAULT_TRAIN, help=f"training examples per task (default {DEFAULT_TRAIN})")
    parser.add_argument("--test", type=int, default=50, help="held-out examples per task (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args()
    written = write_tasks(Path(args.out), parse_sizes(args.train), args.test, args.seed)
    for task, (train, test) in written.items():
        print(f"{task:<10} {train} ({sum(1 for _ in open(train))} lines), {test} ({sum(1 for _ in open(test))} lines)")
    data = " ".join(f"--data {train}" for train, _ in written.values())
    print("\none LoRA on every task (concatenated; add --data-temperature 3 or --data-weights 1,1,1 to rebalance):")
    print(f"  adapterhub train --plugin lora --base BASE {data} --eval-split 0.1 --task multi")
    print("one LoRA per task:")
    for task, (train, _) in written.items():
        print(f"  adapterhub train --plugin lora --base BASE --data {train} --eval-split 0.1 --task {task}")


if __name__ == "__main__":
    main()
