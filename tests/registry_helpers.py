"""Small adapter directories for registry tests, built with numpy (no torch import)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

FINGERPRINT = "sha256:" + "ab" * 32
OTHER_FINGERPRINT = "sha256:" + "cd" * 32


def make_adapter(
    directory: Path,
    *,
    seed: int = 0,
    size: int = 64,
    method: str = "lora",
    parent: str | None = None,
    metadata: bool = True,
    metrics: dict | None = None,
) -> Path:
    """An adapter dir: adapter_config.json + adapter_model.safetensors (+ adapterhub.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, size), dtype=np.float32),
        "base_model.model.layers.0.q_proj.lora_B.weight": rng.standard_normal((size, 4), dtype=np.float32),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "tiny"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if metadata:
        meta = {
            "method": method,
            "method_config": {"r": 4, "lora_alpha": 8},
            "base": {"name": "tiny", "fingerprint": FINGERPRINT},
            "training": {"lr": 1e-3, "seed": seed},
            "metrics": metrics if metrics is not None else {"loss": 1.0 / (seed + 1)},
            "parent": parent,
        }
        (directory / "adapterhub.json").write_text(json.dumps(meta))
    return directory
