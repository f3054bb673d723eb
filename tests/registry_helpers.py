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


def _publisher_main(argv: list[str]) -> None:
    """A publisher process for the concurrency and crash tests (numpy only, no torch).

    usage: registry_helpers.py REGISTRY TASK WRITER COUNT SIZE GO_FILE KILL
    COUNT 0 publishes forever; GO_FILE ("-" for none) is awaited after printing "ready";
    KILL is "none" or "replace:K" / "fsync:K": SIGKILL this process at the K-th such call.
    """
    import os
    import signal
    import sys
    import time

    from adapterhub.registry import FileStore

    registry, task, writer, count, size, go_file, kill = argv
    writer, count, size = int(writer), int(count), int(size)
    work = Path(registry).parent / f"work-{writer}-{os.getpid()}"
    if kill != "none":
        name, k = kill.split(":")
        real = getattr(os, name)
        calls = [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(k):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(os, name, dying)
    store = FileStore(registry)
    print("ready", flush=True)
    while go_file != "-" and not os.path.exists(go_file):
        time.sleep(0.005)
    i = 0
    while count == 0 or i < count:
        seed = writer * 1000 + i
        adapter = make_adapter(work / str(i), seed=seed, size=size)
        manifest = store.publish(task, adapter, extra={"writer": writer, "i": i})
        print(f"published {manifest.ref}", flush=True)
        i += 1
    sys.exit(0)


if __name__ == "__main__":
    import sys

    _publisher_main(sys.argv[1:])
