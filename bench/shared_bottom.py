"""A shared bottom with three tops (``train --on``) vs one LoRA per task, on SmolLM2-135M-Instruct.

    python bench/shared_bottom.py [--base DIR] [--train sentiment=160,topic=80,category=40] [--test 50]
                                  [--top-r 4] [--top-epochs 3] [--max-steps N] [--threads N]
                                  [--json bench/results/shared_bottom.json]

Runs, each through ``adapterhub.pipeline.train_and_publish`` (the path ``adapterhub train`` takes)
into a temporary registry, with LoRA's recommended options (lr 1e-3, 3 epochs, batch 8):

- ``single:<task>``: one LoRA per task on its own file, from the base;
- ``bottom``: one LoRA on the three files concatenated, published as ``shared@1``;
- ``top:<task>``: a LoRA of rank ``--top-r`` per task trained ``--on shared@1`` on its own file.

Every adapter is scored by greedy exact match on every task's held-out test file. A top is scored
as the server serves it: ``shared@1`` folded into the base weights, the top on it (the same
forward as the server's composition, to 1e-4: tests/test_shared_bottom.py). The numbers to read:
does a top on the shared bottom match or beat the task's own LoRA, at fewer trainable weights per
task and less training per task? ``--max-steps`` caps every run (a smoke run on a small base).
This is slow on 2 cores (minutes per run on SmolLM2): run it where cores are free.
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
    parser.add_argument("--train", default="sentiment=160,topic=80,category=40", help="training examples per task")
    parser.add_argument("--test", type=int, default=50, help="held-out examples per task")
    parser.add_argument("--top-r", type=int, default=4, help="LoRA rank of each top (the bottom and singles: 8)")
    parser.add_argument("--top-epochs", type=float, default=3.0, help="epochs of each top")
    parser.add_argument("--max-steps", type=int, default=-1, help="cap every run at this many steps (-1: epochs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for training (default 1)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "shared_bottom.json"))
    args = parser.parse_args()

    import torch

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.data import read_examples
    from adapterhub.generation import exact_match
    from adapterhub.manager import get_manager
    from adapterhub.pipeline import train_and_publish
    from adapterhub.registry import open_registry
    from adapterhub.stacking import fold_bottoms
    from adapterhub.training import TrainOptions

    started = time.perf_counter()
    sizes = parse_sizes(args.train)
    method = get_manager().get_method("lora")
    work = Path(tempfile.mkdtemp(prefix="adapterhub-shared-bottom-"))
    registry = str(work / "registry")
    files = write_tasks(work / "data", sizes, args.test)
    tests = {task: read_examples(test) for task, (_, test) in files.items()}
    answer_tokens = 6  # one label word and the end of turn

    def train(name: str, data: list[str], task: str, config: dict, options: dict, on: str | None = None) -> dict:
        values = {"progress": False, "seed": 0, "threads": args.threads, "max_steps": args.max_steps, **options}
        top = {"base": args.base, "data": data, "task": task, "registry": registry, "on_adapter": on}
        t0 = time.perf_counter()
        outcome = train_and_publish(method, method.make_config(config), TrainOptions.for_method(method, values), top)
        run = {"ref": outcome.reference, "train_s": round(time.perf_counter() - t0, 1),
               "steps": outcome.metrics["global_step"], "train_loss": round(outcome.metrics["train_loss"], 4),
               "trainable": trainable_count(open_registry(registry), outcome.reference)}
        print(name, run, flush=True)
        return run

    def score(refs: list[str]) -> dict[str, float]:
        """Exact match per task of the base with ``refs`` applied, the last one as an adapter, the
        ones before folded into the weights (bottoms first)."""
        store = open_registry(registry)
        base = load_base(args.base)
        model = base.model
        if refs:
            fold_bottoms(base, [store.manifest(r) for r in refs[:-1]], registry)
            _, model = load_adapter(base.model, store.materialize(refs[-1]))
        em = {t: exact_match(model, base.tokenizer, tests[t], max_new_tokens=answer_tokens) for t in tests}
        torch.set_num_threads(args.threads)
        return em

    results = {"base": args.base, "method": "lora", "train_examples": sizes, "test_examples": args.test,
               "top_r": args.top_r, "top_epochs": args.top_epochs, "max_steps": args.max_steps,
               "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(), "runs": {}}
    try:
        results["base_em"] = score([])
        print("base", results["base_em"], flush=True)
        for task, (train_file, _) in files.items():
            run = train(f"single:{task}", [str(train_file)], f"single-{task}", {}, {})
            run["exact_match"] = score([run["ref"]])
            results["runs"][f"single:{task}"] = run
        bottom = train("bottom", [str(f) for f, _ in files.values()], "shared", {}, {})
        bottom["exact_match"] = score([bottom["ref"]])
        results["runs"]["bottom"] = bottom
        for task, (train_file, _) in files.items():
            run = train(f"top:{task}", [str(train_file)], task, {"r": args.top_r, "alpha": 2 * args.top_r},
                        {"epochs": args.top_epochs}, on=bottom["ref"])
            run["exact_match"] = score([bottom["ref"], run["ref"]])
            results["runs"][f"top:{task}"] = run
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    print()
    print(markdown_table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def trainable_count(store, ref: str) -> int:
    """Weights the adapter adds (its safetensors' element count), read from the header."""
    from safetensors import safe_open

    directory = store.materialize(ref)
    total = 0
    with safe_open(str(Path(directory) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            count = 1
            for n in shape:
                count *= n
            total += count
    return total


def markdown_table(results: dict) -> str:
    tasks = list(results["train_examples"])
    head = (["adapter", "steps", "weights"] + [f"{t} EM (base {results['base_em'][t]:.2f})" for t in tasks]
            + ["train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, run in results["runs"].items():
        shown = f"{name} (on {results['runs']['bottom']['ref']})" if name.startswith("top:") else name
        cells = ([shown, str(run["steps"]), f"{run['trainable']:,}"]
                 + [f"{run['exact_match'][t]:.2f}" for t in tasks] + [f"{run['train_s']:.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t} {n}" for t, n in results["train_examples"].items())
    lines.append(f"\ngreedy exact match on {results['test_examples']} held-out examples per task; training files "
                 f"{sizes}; tops: rank {results['top_r']}, {results['top_epochs']:g} epochs, each scored with the "
                 "bottom folded in (as served)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
