"""Does every method learn? Exact match on a synthetic task, base vs each method, one run.

    python examples/method_accuracy.py [--task topic] [--methods lora,adapter,...]

Trains each registered method on the same data with a learning rate that suits it, evaluates the
trained adapter on held-out examples with greedy decoding, and prints a table. The base is the
random-init tiny preset, so it scores 0 and soft-prompt methods (which steer a model rather than
change it) have the least to work with.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

# method -> (learning rate, steps, config overrides); the defaults suit the LoRA family.
SETTINGS = {
    "lora": (3e-3, 400, {}),
    "qlora": (3e-3, 400, {}),
    "dora": (3e-3, 400, {}),
    "adalora": (5e-3, 400, {}),
    "loraplus": (5e-4, 400, {}),
    "ia3": (3e-2, 400, {}),
    "adapter": (1e-2, 400, {}),
    "prefix": (3e-2, 600, {"num_virtual_tokens": 16}),
    "prompt": (3e-2, 600, {}),
    "ptuning": (5e-3, 600, {}),
    "bitfit": (2e-2, 400, {}),
    "freeze": (1e-3, 400, {}),
    "full": (5e-4, 400, {}),
    "loha": (5e-3, 400, {}),
}


def main() -> None:
    import torch

    from adapterhub.base import init_base, load_base
    from adapterhub.data import load_dataset, read_examples
    from adapterhub.generation import exact_match
    from adapterhub.manager import PluginManager
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="topic")
    parser.add_argument("--methods", help="comma-separated (default: every registered method)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    manager = PluginManager()
    names = args.methods.split(",") if args.methods else list(manager.methods())
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = init_base("tiny", f"{tmp}/base")
        train_path, test_path = write_split(args.task, f"{tmp}/data", n_train=2000, n_test=100)
        test = read_examples(test_path)
        base = load_base(base_dir)
        rows = [("(base)", "", 0, exact_match(base.model, base.tokenizer, test, max_new_tokens=10), 0.0)]
        for name in names:
            method = manager.get_method(name)
            lr, steps, overrides = SETTINGS.get(name, (3e-3, 400, {}))
            base = load_base(base_dir, getattr(method, "default_quantize", None) or "none")
            data = load_dataset(train_path, base.tokenizer)
            t0 = time.perf_counter()
            options = TrainOptions(max_steps=steps, lr=lr, batch_size=16, warmup_steps=20, progress=False,
                                   logging_steps=100, seed=0)
            result = method.train(base.model, data, method.make_config(overrides), options, tokenizer=base.tokenizer)
            seconds = time.perf_counter() - t0
            em = exact_match(result.model, base.tokenizer, test, max_new_tokens=10)
            rows.append((name, f"{lr:g}", steps, em, seconds))
            print(f"{name:<10} lr={lr:<7g} steps={steps:<4} exact match {em:.2f}  ({seconds:.0f} s)", flush=True)
    print(f"\n| method | lr | steps | exact match ({args.task}, 100 held-out) | train s |\n| --- | --- | --- | --- | --- |")
    for name, lr, steps, em, seconds in rows:
        print(f"| {name} | {lr} | {steps} | {em:.2f} | {seconds:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("method", "lr", "steps", "exact_match", "train_s"), r)) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
