"""(d) Training overhead: ``adapterhub train --plugin lora`` vs a plain PEFT + Trainer script.

Same base (fp32), same data (the built-in sentiment task, 256 examples; 42 tokens an example on
SmolLM2 with its chat template), same LoRA config (r 16, alpha 32, every Linear but the head, no
dropout), batch 8, lr 2e-4, same number of steps, one thread each, in fresh subprocesses,
alternated ``ROUNDS`` times. Step time = the Trainer's ``train_runtime`` / steps (model loading
and saving excluded for both). Target: <= 1.05x.

Base: ``BENCH_BASE`` (see :mod:`bench.common`), by default SmolLM2-135M-Instruct (30 layers, 210
LoRA targets; about 4-7 s a step on one thread, so 8 steps a run: ~6 minutes in all on 2 idle
cores); ``BENCH_BASE=small`` gives the random 6-layer base (16 steps a run, ~3 minutes).
``BENCH_TRAIN_STEPS`` overrides the steps. Results: ``bench/results/training.json`` (small base)
or ``training-smollm2.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common

DEFAULT_STEPS = {"small": 16, "smollm2": 8}
ROUNDS = 3


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"), "PYTHONPATH": str(common.ROOT.parent)}


def adapterhub_step_s(base_dir: Path, data: Path, tmp: Path, i: int, steps: int) -> float:
    out = tmp / f"ah-{i}"
    subprocess.run([sys.executable, "-m", "adapterhub.cli", "train", "--plugin", "lora", "--base", str(base_dir),
                    "--data", str(data), "--max-steps", str(steps), "--batch-size", "8", "--lr", "2e-4",
                    "--set", "r=16", "--set", "alpha=32", "--set", "dropout=0", "--no-publish", "--output", str(out),
                    "--no-progress", "--seed", "0", "--run-dir", str(tmp / f"run-{i}")],
                   check=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "adapterhub.json").read_text())["metrics"]["train_runtime_s"] / steps


def peft_step_s(base_dir: Path, data: Path, tmp: Path, i: int, steps: int) -> float:
    out = tmp / f"peft-{i}.json"
    subprocess.run([sys.executable, "-m", "bench.peft_trainer_script", str(base_dir), str(data), str(steps), str(out)],
                   check=True, env=_env(), cwd=str(common.ROOT.parent), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["train_runtime_s"] / steps


def main() -> dict:
    from adapterhub.tasks import write_split

    common.threads()
    shape = common.shape()
    steps = int(os.environ.get("BENCH_TRAIN_STEPS", DEFAULT_STEPS[shape.name]))
    base_dir = common.base_dir(shape)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, _ = write_split("sentiment", tmp / "data", n_train=256, n_test=8)
        ah, pf = [], []
        for i in range(ROUNDS):
            pf.append(peft_step_s(base_dir, data, tmp, i, steps))
            ah.append(adapterhub_step_s(base_dir, data, tmp, i, steps))
            print(f"round {i}: adapterhub {ah[-1]:.3f}s/step, PEFT + Trainer {pf[-1]:.3f}s/step")
    ratio = min(ah) / min(pf)
    results = {"base": shape.name, "base_label": shape.label, "steps": steps, "adapterhub_step_s": ah, "peft_trainer_step_s": pf, "ratio_of_best": ratio,
               "ratio_of_medians": sorted(ah)[len(ah) // 2] / sorted(pf)[len(pf) // 2]}
    print(f"{shape.label}, {steps} steps a run:")
    print(common.table(["contestant", "best s/step", "median s/step"], [
        ["adapterhub train --plugin lora", min(ah), sorted(ah)[len(ah) // 2]],
        ["plain PEFT + Trainer", min(pf), sorted(pf)[len(pf) // 2]],
        ["ratio", ratio, results["ratio_of_medians"]]]))
    results["targets"] = [common.verdict("adapterhub / PEFT + Trainer step time (best of rounds)", ratio, "<=", 1.05)]
    name = common.result_name("training", shape)
    common.save(name, results)

    def draw(ax):
        ax.plot(range(ROUNDS), ah, marker="o", label="adapterhub train --plugin lora")
        ax.plot(range(ROUNDS), pf, marker="s", label="plain PEFT + Trainer")
        ax.set_xlabel("round (alternating, fresh processes)")
        ax.set_ylabel("seconds per step")
        ax.set_ylim(bottom=0)
        ax.set_title(f"(d) training step time, {shape.name} base fp32, ratio {ratio:.3f}")
        ax.legend()

    common.plot(name, draw)
    return results


if __name__ == "__main__":
    main()
