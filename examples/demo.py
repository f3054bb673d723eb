"""`make demo`: the whole story on the built-in tiny base, in a few minutes on 2 CPU cores.

1. build the tiny base (`adapterhub base init`)
2. train adapters on synthetic tasks with the CLI (`adapterhub train --plugin ...`), which
   publishes each to a registry and prints its reference
3. evaluate exact-match accuracy on held-out examples, base vs adapter, and print a table
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
# task -> (method, method config, training flags)
JOBS = {
    "sentiment": ("lora", ["--set", "r=16"], ["--max-steps", "300", "--lr", "3e-3"]),
}


def run(*args: str) -> str:
    """Run the adapterhub CLI like a user would; return its last stdout line."""
    cmd = [sys.executable, "-m", "adapterhub", *args]
    print("$ adapterhub " + " ".join(args), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"demo step failed: adapterhub {' '.join(args)}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    import torch

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.data import read_examples
    from adapterhub.generation import exact_match
    from adapterhub.pipeline import resolve_adapter_dir
    from adapterhub.tasks import write_split

    torch.set_num_threads(os.cpu_count() or 2)
    started = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    base_dir, registry = OUT / "base", OUT / "registry"
    run("base", "init", "--preset", "tiny", "--out", str(base_dir))

    rows = []
    for task, (method, config_flags, train_flags) in JOBS.items():
        train, test = write_split(task, OUT / "data" / task, n_train=2000, n_test=100)
        t0 = time.perf_counter()
        ref = run("train", "--plugin", method, "--base", str(base_dir), "--data", str(train), "--task", task,
                  "--registry", str(registry), "--batch-size", "16", "--no-progress", *config_flags, *train_flags)
        train_s = time.perf_counter() - t0
        examples = read_examples(test)
        base = load_base(base_dir)
        base_acc = exact_match(base.model, base.tokenizer, examples, max_new_tokens=16)
        adapter_dir, _ = resolve_adapter_dir(ref, str(registry))
        _, model = load_adapter(load_base(base_dir).model, adapter_dir, base_fingerprint=base.fingerprint)
        adapter_acc = exact_match(model, base.tokenizer, examples, max_new_tokens=16)
        rows.append((task, method, ref, base_acc, adapter_acc, train_s))

    print()
    print(f"{'task':<10} {'method':<8} {'adapter':<14} {'base EM':>8} {'adapter EM':>11} {'train s':>8}")
    for task, method, ref, base_acc, adapter_acc, train_s in rows:
        print(f"{task:<10} {method:<8} {ref:<14} {base_acc:>8.2f} {adapter_acc:>11.2f} {train_s:>8.1f}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s (exact match on 100 held-out examples each)")
    if any(adapter_acc < base_acc + 0.5 for *_, base_acc, adapter_acc, _ in rows):
        raise SystemExit("an adapter did not learn its task (exact match not far above the base)")


if __name__ == "__main__":
    main()
