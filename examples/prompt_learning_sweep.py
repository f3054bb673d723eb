"""A small, bounded sweep of one method's training options and config on one synthetic task.

    python examples/prompt_learning_sweep.py --method prefix --task newlabels --train 240 \\
        --points '[{}, {"options": {"lr": 1e-2}}, {"config": {"prefix_projection": true}}]' \\
        --json bench/results/prompt_learning_sweep.json

Each point trains from the method's recommended options and config defaults with the point's
overrides (an empty point is the defaults) and is scored by greedy exact match (the method's own
forward, token by token) on the held-out split and on the first ``--test`` training prompts. Rows
are appended to ``--json`` as they finish, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from method_accuracy import DEFAULT_CACHE, answer_tokens


def main() -> None:
    import torch

    from adapterhub.base import load_base
    from adapterhub.data import load_dataset, read_examples
    from adapterhub.generation import exact_match
    from adapterhub.manager import PluginManager
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions, seed_everything

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(DEFAULT_CACHE))
    parser.add_argument("--method", required=True)
    parser.add_argument("--task", default="newlabels")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--points", default="[{}]", help="JSON list of {options: {...}, config: {...}}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method = PluginManager().get_method(args.method)
    out = Path(args.json)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        train_path, test_path = write_split(args.task, tmp, n_train=args.train, n_test=args.test)
        held_out, seen = read_examples(test_path), read_examples(train_path)[: args.test]
        for point in json.loads(args.points):
            base = load_base(args.base, "none")
            options = TrainOptions.for_method(method, {"progress": False, "seed": 0, "run_dir": str(Path(tmp) / "run"),
                                                       **point.get("options", {})})
            config = method.make_config(point.get("config", {}))
            seed_everything(options.seed)
            t0 = time.perf_counter()
            result = method.train(base.model, load_dataset(train_path, base.tokenizer, options.max_length), config,
                                  options, tokenizer=base.tokenizer)
            seconds = time.perf_counter() - t0
            scores = {name: exact_match(result.model, base.tokenizer, examples,
                                        max_new_tokens=answer_tokens(base.tokenizer, examples))
                      for name, examples in (("held_out", held_out), ("train", seen))}
            row = {"method": args.method, "task": args.task, "train_examples": args.train, "point": point,
                   "lr": options.lr, "epochs": options.epochs, "config": config.to_dict(),
                   "steps": result.metrics["global_step"], "train_loss": round(result.metrics["train_loss"], 4),
                   "train_s": round(seconds, 1), "exact_match": scores}
            print(json.dumps(row), flush=True)
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"base": args.base, "test_examples": args.test, "rows": rows}, indent=2) + "\n")
            del result, base


if __name__ == "__main__":
    main()
