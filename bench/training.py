"""(d) Training overhead: ``adapterhub train --plugin lora`` vs a plain PEFT + Trainer script.

Same small base (fp32), same data (the built-in sentiment task, 256 examples), same LoRA config
(r 16, alpha 32, every Linear but the head, no dropout), batch 8, lr 2e-4, same number of steps,
one thread each, in fresh subprocesses, alternated ``ROUNDS`` times. Step time = the Trainer's
``train_runtime`` / steps (model loading and saving excluded for both). Target: <= 1.05x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common

STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "16"))
ROUNDS = 3


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"), "PYTHONPATH": str(common.ROOT.parent)}


def adapterhub_step_s(base_dir: Path, data: Path, tmp: Path, i: int) -> float:
    out = tmp / f"ah-{i}"
    subprocess.run([sys.executable, "-m", "adapterhub.cli", "train", "--plugin", "lora", "--base", str(base_dir),
                    "--data", str(data), "--max-steps", str(STEPS), "--batch-size", "8", "--lr", "2e-4",
                    "--set", "r=16", "--set", "alpha=32", "--set", "dropout=0", "--no-publish", "--output", str(out),
                    "--no-progress", "--seed", "0", "--run-dir", str(tmp / f"run-{i}")],
                   check=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "adapterhub.json").read_text())["metrics"]["train_runtime_s"] / STEPS


def peft_step_s(base_dir: Path, data: Path, tmp: Path, i: int) -> float:
    out = tmp / f"peft-{i}.json"
    subprocess.run([sys.executable, "-m", "bench.peft_trainer_script", str(base_dir), str(data), str(STEPS), str(out)],
                   check=True, env=_env(), cwd=str(common.ROOT.parent), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["train_runtime_s"] / STEPS


def main() -> dict:
    from adapterhub.tasks import write_split

    common.threads()
    base_dir = common.small_base()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, _ = write_split("sentiment", tmp / "data", n_train=256, n_test=8)
        ah, pf = [], []
        for i in range(ROUNDS):
            pf.append(peft_step_s(base_dir, data, tmp, i))
            ah.append(adapterhub_step_s(base_dir, data, tmp, i))
            print(f"round {i}: adapterhub {ah[-1]:.3f}s/step, PEFT + Trainer {pf[-1]:.3f}s/step")
    ratio = min(ah) / min(pf)
    results = {"steps": STEPS, "adapterhub_step_s": ah, "peft_trainer_step_s": pf, "ratio_of_best": ratio,
               "ratio_of_medians": sorted(ah)[len(ah) // 2] / sorted(pf)[len(pf) // 2]}
    print(common.table(["contestant", "best s/step", "median s/step"], [
        ["adapterhub train --plugin lora", min(ah), sorted(ah)[len(ah) // 2]],
        ["plain PEFT + Trainer", min(pf), sorted(pf)[len(pf) // 2]],
        ["ratio", ratio, results["ratio_of_medians"]]]))
    results["targets"] = [common.verdict("adapterhub / PEFT + Trainer step time (best of rounds)", ratio, "<=", 1.05)]
    common.save("training", results)

    def draw(ax):
        ax.plot(range(ROUNDS), ah, marker="o", label="adapterhub train --plugin lora")
        ax.plot(range(ROUNDS), pf, marker="s", label="plain PEFT + Trainer")
        ax.set_xlabel("round (alternating, fresh processes)")
        ax.set_ylabel("seconds per step")
        ax.set_ylim(bottom=0)
        ax.set_title(f"(d) training step time, small base fp32, ratio {ratio:.3f}")
        ax.legend()

    common.plot("training", draw)
    return results


if __name__ == "__main__":
    main()
