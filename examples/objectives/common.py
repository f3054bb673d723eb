"""What the objective measurements share: the real base, data files, a results file.

Each ``examples/objectives/<objective>.py`` trains on SmolLM2-135M-Instruct with data it
generates itself (deterministic, from :mod:`adapterhub.tasks` style generators), measures the
adapter before and after on held-out data, prints the numbers and writes them to
``bench/results/objectives/<objective>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "objectives"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub" / "smollm2-135m-instruct"


def real_base(base: str | None = None) -> Path:
    """``base`` as given, else the SmolLM2 preset written once into the cache directory (~25 s)."""
    from adapterhub.base import init_base

    if base:
        return Path(base)
    if not (DEFAULT_CACHE / "config.json").is_file():
        print(f"writing the smollm2-135m-instruct base to {DEFAULT_CACHE} (once)", flush=True)
        init_base("smollm2-135m-instruct", DEFAULT_CACHE)
    return DEFAULT_CACHE


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_results(objective: str, results: dict[str, Any]) -> Path:
    """Print and write the measurement with where it ran."""
    import torch

    results = {**results, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                      "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M")}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{objective}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return path
