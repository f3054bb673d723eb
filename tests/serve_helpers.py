"""Shared pieces for tests that run a real server: cheap adapters, a registry, a server, offline answers.

Trained adapters are cached per process (keyed by base directory), so the reliability test modules
train their two LoRA adapters once between them. Perturbed copies are written by the method's own
``save`` after scaling ``lora_B`` of a loaded adapter, so every file is a real method artifact.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

_TRAINED: dict[tuple[str, str], Path] = {}


def chat(text: str) -> list[tuple[str, str]]:
    return [("user", f"sentiment?\n\n{text}")]


def train_lora(base_dir: Path, tokenizer, work: Path, data_task: str, *, steps: int = 10, lr: float = 1e-2) -> Path:
    """A LoRA adapter dir trained a few steps on the full-precision base (cached per process)."""
    key = (str(base_dir), data_task)
    if key in _TRAINED and _TRAINED[key].is_dir():
        return _TRAINED[key]
    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.data import load_dataset
    from adapterhub.manager import PluginManager
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions

    train, _ = write_split(data_task, work / f"data-{data_task}", n_train=32, n_test=2)
    method = PluginManager(autoload=False).get_method("lora")
    config = method.make_config({})
    options = TrainOptions(max_steps=steps, lr=lr, batch_size=8, progress=False, seed=0, run_dir=str(work / f"run-{data_task}"))
    result = method.train(load_base(base_dir, "none").model, load_dataset(train, tokenizer, max_length=64), config, options,
                          tokenizer=tokenizer)
    out = save_adapter(method, result.model, config, work / f"lora-{data_task}",
                       base={"name": "tiny", "fingerprint": fingerprint(base_dir)})
    _TRAINED[key] = out
    return out


def scaled_copy(base_dir: Path, source: Path, out: Path, factor: float) -> Path:
    """Load ``source`` with the LoRA method, scale every ``lora_B`` by ``factor``, save with its ``save``."""
    from adapterhub.adapters import save_adapter
    from adapterhub.base import load_base
    from adapterhub.manager import PluginManager

    method = PluginManager(autoload=False).get_method("lora")
    meta = json.loads((source / "adapterhub.json").read_text())
    model = method.load(load_base(base_dir, "none").model, source)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(factor)
    config = method.make_config(meta.get("method_config") or {})
    return save_adapter(method, model, config, out, base=meta["base"])


def publish_copy(store, task: str, source: Path, work: Path, **meta_changes) -> str:
    """Publish ``source`` under ``task`` with ``adapterhub.json`` fields changed; returns the ref."""
    copy = work / f"copy-{task}-{len(list(work.glob('copy-*')))}"
    shutil.copytree(source, copy)
    meta = json.loads((copy / "adapterhub.json").read_text())
    meta.update(meta_changes)
    (copy / "adapterhub.json").write_text(json.dumps(meta))
    return store.publish(task, copy).ref


@contextlib.contextmanager
def running_server(base_dir: Path, registry: Path, **options) -> Iterator:
    """An ``AdapterServer`` on 127.0.0.1 with a free port, stopped afterwards."""
    from adapterhub.serve.server import AdapterServer, ServerOptions

    settings = dict(base=str(base_dir), registry=str(registry), quantize="nf4", port=0, max_adapters=4,
                    max_new_tokens=64)
    settings.update(options)
    server = AdapterServer(ServerOptions(**settings)).start()
    try:
        yield server
    finally:
        server.stop(grace=2)


def health_status(channel, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def serving() -> int:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckResponse.SERVING


class OfflineLora:
    """Greedy reference answers: one nf4 base with many PEFT LoRA adapters, switched per call.

    The same PEFT path ``test_serve`` checks the server against, but the base is loaded once. Every
    adapter is attached before the first forward pass: on the CPU bitsandbytes backend, PEFT layers
    attached after a 4-bit forward give wrong outputs (see serve/exclusive.py, base_to_attach).
    """

    def __init__(self, base_dir: Path, tokenizer, directories: list[Path], dtype: str = "auto"):
        from peft import PeftModel

        from adapterhub.base import load_base

        self.tokenizer = tokenizer
        self.names = {str(d): f"a{i}" for i, d in enumerate(directories)}
        model = None
        for directory, name in self.names.items():
            if model is None:
                model = PeftModel.from_pretrained(load_base(base_dir, "nf4", dtype=dtype).model, directory,
                                                  adapter_name=name)
            else:
                model.load_adapter(directory, adapter_name=name)
        self.model = model
        self.model.eval()

    def tokens(self, directory: Path, messages, max_new: int) -> list[int]:
        from adapterhub.data import render_prompt

        self.model.set_adapter(self.names[str(directory)])
        tok = self.tokenizer
        text = render_prompt(tok, [{"role": r, "content": c} for r, c in messages])
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return out[0, ids.shape[1]:].tolist()


def memory_kb() -> dict[str, int]:
    """VmRSS / VmHWM of this process in kB, from /proc (psutil is not a dependency)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime_ns): equal before and after means nothing was written."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() or p.is_dir()}
