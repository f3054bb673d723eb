"""Does every method learn with its defaults? Base vs adapter exact match on SmolLM2, one run.

    python examples/method_accuracy.py [--base DIR] [--tasks sentiment,flip,newlabels] [--methods lora,prefix,...]
                                       [--json results.json] [--merge-into bench/results/method_accuracy.json]

Every registered method (the built-ins and any installed plugin) trains on the same synthetic data
with its OWN recommended training options (``adapterhub plugins --method NAME``) and its config
defaults: no per-method settings here, because the point is that the defaults learn. Each adapter
is scored by greedy exact match on held-out examples beside the untouched base. The tasks are
ones SmolLM2-135M-Instruct cannot do zero-shot: a fixed label set answered with one word
(``sentiment``), a transformation of the input (``flip``: the words in reverse order), and a
two-label review classification answered with made-up label words the base has never produced,
scored on reviews whose nouns and adjectives no training review has (``newlabels``, 240 examples).

Without ``--base`` the SmolLM2 preset is written once to ``--base-cache`` (about 25 s) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub" / "smollm2-135m-instruct"
TRAIN_EXAMPLES = {"newlabels": 240}  # per task, where not the default --train


def real_base(args: argparse.Namespace) -> Path:
    """``--base`` as given, else the SmolLM2 preset built once into the cache directory."""
    from adapterhub.base import init_base

    if args.base:
        return Path(args.base)
    cache = Path(args.base_cache)
    if not (cache / "config.json").is_file():
        print(f"writing the smollm2-135m-instruct base to {cache} (once)", flush=True)
        init_base("smollm2-135m-instruct", cache)
    return cache


def answer_tokens(tokenizer, examples) -> int:
    """Enough new tokens for the longest reference answer, its end-of-turn token and one more."""
    return 2 + max(len(tokenizer(m[-1]["content"], add_special_tokens=False)["input_ids"]) for m in examples)


def main() -> None:
    import torch

    from adapterhub.base import load_base
    from adapterhub.data import load_dataset, read_examples
    from adapterhub.generation import exact_match
    from adapterhub.manager import PluginManager
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions, seed_everything

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model directory (default: the SmolLM2 preset, built once)")
    parser.add_argument("--base-cache", default=str(DEFAULT_CACHE), help="where the preset is built without --base")
    parser.add_argument("--tasks", default="sentiment,flip,newlabels", help="comma-separated tasks of adapterhub.tasks")
    parser.add_argument("--methods", help="comma-separated (default: every registered method)")
    parser.add_argument("--train", type=int, help=f"training examples per task (default 160, but {TRAIN_EXAMPLES})")
    parser.add_argument("--test", type=int, default=50, help="held-out examples per task")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--merge-into", help="update these methods' rows (and the tasks measured) in this results file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    manager = PluginManager()
    names = args.methods.split(",") if args.methods else list(manager.methods())
    tasks = args.tasks.split(",")
    base_dir = real_base(args)

    sizes = {task: args.train or TRAIN_EXAMPLES.get(task, 160) for task in tasks}
    results: dict = {"base": str(base_dir), "train_examples": args.train or 160, "task_train_examples": sizes,
                     "test_examples": args.test,
                     "tasks": tasks, "threads": torch.get_num_threads(), "machine": platform.machine(),
                     "cpus": os.cpu_count(), "base_em": {}, "methods": []}
    with tempfile.TemporaryDirectory() as tmp:
        splits, tests = {}, {}
        for task in tasks:
            splits[task] = write_split(task, Path(tmp) / task, n_train=sizes[task], n_test=args.test)
            tests[task] = read_examples(splits[task][1])
        base = load_base(base_dir)
        tokenizer = base.tokenizer
        for task in tasks:
            em = exact_match(base.model, tokenizer, tests[task], max_new_tokens=answer_tokens(tokenizer, tests[task]))
            results["base_em"][task] = em
            print(f"{'(base)':<10} {task:<10} exact match {em:.2f}", flush=True)
        del base

        for name in names:
            method = manager.get_method(name)
            options = TrainOptions.for_method(method, {"progress": False, "logging_steps": 10, "seed": 0})
            row = {"method": name, "origin": method.origin, "recommended": dict(method.recommended_options),
                   "config": method.make_config({}).to_dict(), "tasks": {}}
            for task in tasks:
                base = load_base(base_dir, method.default_quantize or "none")
                data = load_dataset(splits[task][0], tokenizer, options.max_length)
                seed_everything(options.seed)
                t0 = time.perf_counter()
                result = method.train(base.model, data, method.make_config({}), options, tokenizer=tokenizer)
                seconds = time.perf_counter() - t0
                em = exact_match(result.model, tokenizer, tests[task], max_new_tokens=answer_tokens(tokenizer, tests[task]))
                row["tasks"][task] = {"exact_match": em, "train_s": round(seconds, 1),
                                      "steps": result.metrics["global_step"],
                                      "train_loss": round(result.metrics["train_loss"], 4)}
                print(f"{name:<10} {task:<10} exact match {em:.2f}  (base {results['base_em'][task]:.2f}; "
                      f"{result.metrics['global_step']} steps, {seconds:.0f} s)", flush=True)
                del result, base
            results["methods"].append(row)
    results["total_s"] = round(time.perf_counter() - started, 1)

    print()
    print(markdown_table(results))
    print(f"\n{len(names)} methods x {len(tasks)} tasks in {results['total_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.merge_into:
        merge_rows(Path(args.merge_into), results)


def merge_rows(path: Path, new: dict) -> None:
    """Re-measured (method, task) cells replace the old ones in ``path``; the rest is kept as it was."""
    old = json.loads(path.read_text())
    rows = {row["method"]: row for row in old["methods"]}
    for row in new["methods"]:
        kept = rows.get(row["method"], {}).get("tasks", {})
        rows[row["method"]] = {**row, "tasks": {**kept, **row["tasks"]}}
    old["methods"] = list(rows.values())
    old["tasks"] = list(dict.fromkeys(old["tasks"] + new["tasks"]))
    old["base_em"] = {**old["base_em"], **new["base_em"]}
    old["task_train_examples"] = {**{t: old["train_examples"] for t in old["tasks"]},
                                  **old.get("task_train_examples", {}), **new["task_train_examples"]}
    old.setdefault("remeasured", []).append({"methods": [r["method"] for r in new["methods"]], "tasks": new["tasks"],
                                             "total_s": new["total_s"], "threads": new["threads"]})
    path.write_text(json.dumps(old, indent=2) + "\n")


def markdown_table(results: dict) -> str:
    tasks = results["tasks"]
    n = results["test_examples"]
    head = ["method", "lr", "epochs", "steps"] + [f"{t} EM (base {results['base_em'][t]:.2f})" for t in tasks]
    lines = ["| " + " | ".join(head + ["train s"]) + " |", "|" + " --- |" * (len(head) + 1)]
    for row in results["methods"]:
        rec = row["recommended"]
        got = {t: row["tasks"][t] for t in tasks if t in row["tasks"]}  # a merged file may lack some cells
        cells = [row["method"], f"{rec.get('lr', '')}", f"{rec.get('epochs', '')}",
                 "/".join(str(got[t]["steps"]) if t in got else "-" for t in tasks)]
        cells += [f"{got[t]['exact_match']:.2f}" if t in got else "-" for t in tasks]
        cells.append("/".join(f"{got[t]['train_s']:.0f}" if t in got else "-" for t in tasks))
        lines.append("| " + " | ".join(cells) + " |")
    sizes = results.get("task_train_examples") or {t: results["train_examples"] for t in tasks}
    lines.append(f"\nexact match on {n} held-out examples per task, greedy; training examples "
                 f"{', '.join(f'{t} {sizes[t]}' for t in tasks)}; train s per task in task order")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
