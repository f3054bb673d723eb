"""Interference: one LoRA on three tasks at once vs one LoRA per task, on SmolLM2-135M-Instruct.

    python bench/multitask.py [--base DIR] [--train sentiment=120,topic=60,category=30] [--test 30]
                              [--weights 1,1,1] [--threads N] [--json bench/results/multitask.json]

Runs, each through ``adapterhub.pipeline.train_and_publish`` (the path ``adapterhub train`` takes)
with LoRA's recommended options (lr 1e-3, 3 epochs, batch 8) and ``--eval-split 0.1``:

- ``single:<task>``: one LoRA per task on its own file;
- ``multi:concat``: one LoRA on the three files concatenated (each task's share is its size);
- ``multi:weights``: one LoRA on the three files mixed by ``--weights`` (default equal shares, so
  the small tasks are drawn more often than their size), same number of examples per epoch.

Each adapter is scored by greedy exact match on held-out test files (a multi-task adapter on every
task, a single-task one on its own), and its per-task eval losses are kept. The unequal default
sizes make concatenation and weights differ. Sized for 2 busy CPU cores (greedy decoding here has
no KV cache); raise --train and --test on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub" / "smollm2-135m-instruct"


def main() -> None:
    from multitask_data import parse_sizes, write_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(DEFAULT_CACHE), help="SmolLM2 directory (adapterhub base init)")
    parser.add_argument("--train", default="sentiment=120,topic=60,category=30", help="training examples per task")
    parser.add_argument("--test", type=int, default=30, help="held-out examples per task")
    parser.add_argument("--weights", default="1,1,1", help="--data-weights of the weighted multi-task run")
    parser.add_argument("--skip-base-score", action="store_true", help="do not score the untouched base")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for training (default 1)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "multitask.json"))
    args = parser.parse_args()

    import torch

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.data import read_examples
    from adapterhub.generation import exact_match
    from adapterhub.manager import PluginManager
    from adapterhub.pipeline import train_and_publish
    from adapterhub.training import TrainOptions

    torch.set_num_threads(args.threads)  # scoring too: more threads than free cores only adds waiting
    started = time.perf_counter()
    sizes = parse_sizes(args.train)
    manager = PluginManager(autoload=False)
    method = manager.get_method("lora")
    work = Path(tempfile.mkdtemp(prefix="adapterhub-multitask-"))
    files = write_tasks(work / "data", sizes, args.test)
    tests = {task: read_examples(test) for task, (_, test) in files.items()}
    answer_tokens = 6  # one label word and the end of turn
    runs = {f"single:{task}": {"data": [str(train)]} for task, (train, _) in files.items()}
    runs["multi:concat"] = {"data": [str(train) for train, _ in files.values()]}
    runs["multi:weights"] = {"data": [str(train) for train, _ in files.values()], "data_weights": args.weights}
    results = {"base": args.base, "method": "lora", "train_examples": sizes, "test_examples": args.test,
               "weights": args.weights, "threads": args.threads, "machine": platform.machine(),
               "cpus": os.cpu_count(), "runs": {}}
    try:
        if not args.skip_base_score:
            base = load_base(args.base)
            results["base_em"] = {t: exact_match(base.model, base.tokenizer, tests[t], max_new_tokens=answer_tokens)
                                  for t in tests}
            del base
            print("base", results["base_em"], flush=True)
        for name, data in runs.items():
            options = TrainOptions.for_method(method, {"progress": False, "seed": 0, "eval_split": 0.1,
                                                       "threads": args.threads})
            top = {"base": args.base, "no_publish": True, "output": str(work / name.replace(":", "-")), **data}
            t0 = time.perf_counter()
            outcome = train_and_publish(method, method.make_config({}), options, top)
            seconds = time.perf_counter() - t0
            base = load_base(args.base)
            _, model = load_adapter(base.model, outcome.directory)
            scored = tests if name.startswith("multi") else [name.removeprefix("single:")]
            em = {t: exact_match(model, base.tokenizer, tests[t], max_new_tokens=answer_tokens) for t in scored}
            meta = json.loads((outcome.directory / "adapterhub.json").read_text())
            results["runs"][name] = {
                "exact_match": em, "train_s": round(seconds, 1), "steps": outcome.metrics["global_step"],
                "eval_loss": {k: round(v, 4) for k, v in outcome.metrics.items()
                              if k.startswith("eval_") and k.endswith("_loss")},
                "drawn": {f["name"]: f["drawn"] for f in meta["training"].get("data_mixture", {}).get("files", [])},
            }
            print(name, results["runs"][name], flush=True)
            save(args.json, results)  # what is done survives an interrupted run
            del model, base
            torch.set_num_threads(args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    print()
    print(markdown_table(results))
    save(args.json, {**results, "complete": True})


def save(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"complete": False, **results}, indent=2) + "\n")


def markdown_table(results: dict) -> str:
    tasks = list(results["train_examples"])
    base = results.get("base_em")
    head = ["adapter", "steps"] + [f"{t} EM" + (f" (base {base[t]:.2f})" if base else "") for t in tasks] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, run in results["runs"].items():
        scores = [f"{run['exact_match'][t]:.2f}" if t in run["exact_match"] else "" for t in tasks]
        cells = [name, str(run["steps"])] + scores + [f"{run['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t} {n}" for t, n in results["train_examples"].items())
    lines.append(f"\ngreedy exact match on {results['test_examples']} held-out examples per task; training files "
                 f"{sizes} (90% trained, 10% eval split); weighted run: --data-weights {results['weights']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
