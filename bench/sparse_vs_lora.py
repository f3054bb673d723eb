"""Sparse (SHiRA) vs LoRA at equal trainable parameters on SmolLM2-135M-Instruct, and the sparse lr sweep.

    python bench/sparse_vs_lora.py [--tasks sentiment,flip] [--runs "lora:r=8;sparse:r=8,lr=3e-3"]
                                   [--json bench/results/sparse_vs_lora.json]

Each run is ``method:key=value,...`` (``lr`` a training option, the rest method config keys). By
default: LoRA rank 8 on every Linear of the decoder layers at its recommended options, and the
sparse method at its recommended options with ``r=8``: SHiRA gives a module ``W [out, in]``
``r * (in + out)`` trainable entries, a rank-r LoRA's count on it, so the two train exactly as many
parameters (the script counts them and says so). Same data, seed, batch (8) and epochs as
``examples/method_accuracy.py``: 160 training examples, greedy exact match on 50 held-out ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub" / "smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RUNS = "lora:r=8;sparse:r=8"


def parse_runs(text: str) -> list[tuple[str, dict, dict]]:
    """``lora:r=8;sparse:r=8,lr=3e-3`` -> [(method, config values, option values)]."""
    runs = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        name, _, rest = spec.partition(":")
        config, options = {}, {}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            (options if key == "lr" else config)[key] = float(value) if key == "lr" else value
        runs.append((name, config, options))
    return runs


def main() -> None:
    import torch

    from adapterhub.base import load_base
    from adapterhub.data import load_dataset, read_examples
    from adapterhub.generation import exact_match
    from adapterhub.manager import PluginManager
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions, seed_everything

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(BASE), help="base model directory (SmolLM2 preset)")
    parser.add_argument("--tasks", default="sentiment,flip")
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help="';'-separated method:key=value,... (lr: a training option; others: config keys)")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS / "sparse_vs_lora.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs (and tasks) already in --json that this one does not measure again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manager = PluginManager()
    tasks = args.tasks.split(",")
    results: dict = {"base": args.base, "tasks": tasks, "train_examples": args.train, "test_examples": args.test,
                     "threads": args.threads, "cpus": os.cpu_count(), "machine": platform.machine(), "runs": []}
    total_params = sum(p.numel() for p in load_base(args.base, "none").model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_base(args.base, "none").tokenizer
        splits = {t: write_split(t, Path(tmp) / t, n_train=args.train, n_test=args.test) for t in tasks}
        for name, config_values, option_values in parse_runs(args.runs):
            method = manager.get_method(name)
            config = method.make_config(config_values)
            options = TrainOptions.for_method(method, {"progress": False, "logging_steps": 10, "seed": 0,
                                                       **option_values})
            row = {"method": name, "config": config.to_dict(), "lr": options.lr, "epochs": options.epochs, "tasks": {}}
            for task in tasks:
                train, test = splits[task]
                examples = read_examples(test)
                base = load_base(args.base, "none")
                data = load_dataset(train, tokenizer, options.max_length)
                seed_everything(options.seed)
                t0 = time.perf_counter()
                result = method.train(base.model, data, config, options, tokenizer=tokenizer)
                seconds = time.perf_counter() - t0
                trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
                longest = max(len(tokenizer(m[-1]["content"], add_special_tokens=False)["input_ids"]) for m in examples)
                em = exact_match(result.model, tokenizer, examples, max_new_tokens=longest + 2)
                row["trainable_params"] = trainable
                row["trainable_share"] = round(trainable / total_params, 6)
                row["tasks"][task] = {"exact_match": em, "train_s": round(seconds, 1),
                                      "steps": result.metrics["global_step"],
                                      "train_loss": round(result.metrics["train_loss"], 4)}
                print(f"{name:<7} {json.dumps(config_values):<28} lr {options.lr:<7g} {task:<10} EM {em:.2f}  "
                      f"loss {result.metrics['train_loss']:.3f}  {trainable:,} trainable  {seconds:.0f} s", flush=True)
                del result, base
            results["runs"].append(row)
    if args.merge and Path(args.json).is_file():
        results = merged(json.loads(Path(args.json).read_text()), results)
    counts = {r["trainable_params"] for r in results["runs"]}
    results["equal_trainable_params"] = len(counts) == 1
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}; equal trainable parameters: {results['equal_trainable_params']}")


def merged(old: dict, new: dict) -> dict:
    """``old``'s runs with ``new``'s (the same method, config and lr: their tasks replaced) added."""
    key = lambda run: (run["method"], json.dumps(run["config"], sort_keys=True), run["lr"])  # noqa: E731
    runs = {key(run): run for run in old["runs"]}
    for run in new["runs"]:
        if key(run) in runs:
            run = {**runs[key(run)], **run, "tasks": {**runs[key(run)]["tasks"], **run["tasks"]}}
        runs[key(run)] = run
    tasks = list(dict.fromkeys(old["tasks"] + new["tasks"]))
    return {**old, **new, "tasks": tasks, "runs": list(runs.values())}


if __name__ == "__main__":
    main()
