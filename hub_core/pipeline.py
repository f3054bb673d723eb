"""End-to-end jobs the CLI runs: train -> save -> publish, and merge into a full base.

Kept apart from the CLI so tests, the demo and the server use the same code.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from adapterhub.registry import open_registry

from .adapters import adapter_metadata, load_adapter, resolve_adapter_dir, save_adapter
from .base import DTYPE_CHOICES, load_base
from .errors import ConfigError
from .threads import use_threads
from .manager import get_manager
from .metadata import check_base
from .mixture import parse_sources, read_mixture
from .objective import CAUSAL_LM, TrainingJob
from .objectives.shapes import split_rows
from .presets import saved_dtype
from .stacking import bottoms_of, fold_bottoms, plan_bottoms, requirement_of
from .training import resolve_checkpoint, seed_everything


@dataclasses.dataclass
class TrainOutcome:
    directory: Path | None
    """Where the adapter was written; None on ranks other than 0 (they write nothing)."""
    reference: str | None
    metrics: dict[str, Any]


def is_main_process() -> bool:
    """Under torchrun / accelerate only rank 0 writes the adapter and publishes it."""
    return int(os.environ.get("RANK", "0")) == 0


def train_and_publish(method: Any, config: Any, options: Any, top: dict[str, Any], objective: Any = None,
                      objective_config: Any = None) -> TrainOutcome:
    """Read the data, load the base, train with the objective (SFT by default), save the adapter,
    publish it (unless told not to).

    Everything a user can get wrong (paths, data lines, --from, checkpoint, what the objective's
    config names) is checked before the base loads.
    """

    objective = objective or get_manager().get_objective("sft")
    objective_config = objective_config or objective.make_config({})
    quantize = top.get("quantize") or getattr(method, "default_quantize", None) or "none"
    if quantize != "none" and not method.capabilities.quantized_base:
        raise ConfigError(f"method {method.name!r} does not train on a quantized base; use --quantize none")
    sources = parse_sources(top["data"], top.get("data_weights"), top.get("data_temperature"))
    if len(sources) == 1:  # one file: the run (and its lineage) as it always was
        only = top["data"][0] if isinstance(top["data"], (list, tuple)) else top["data"]
        plain = isinstance(only, (str, os.PathLike)) and Path(only).is_file()
        top = {**top, "data": only if plain else sources[0].path}
    if options.eval_data and not Path(options.eval_data).is_file():
        raise ConfigError(f"--eval-data {options.eval_data}: file not found")
    resolve_checkpoint(options)
    objective.check_method(method)
    objective.check(objective_config, registry=top.get("registry"))
    mixture = read_mixture(objective, sources, options, top.get("data_temperature")) if len(sources) > 1 else None
    if mixture is not None:  # several files: tasks mixed, each held out alone (adapterhub.mixture)
        rows, eval_rows = mixture.rows, mixture.eval_rows
    else:
        rows = objective.read_data(top["data"])
        eval_rows = None
        if options.eval_data:
            eval_rows = objective.read_data(options.eval_data)
        elif options.eval_split:
            rows, eval_rows = split_rows(rows, options.eval_split, options.seed, str(top["data"]))
    parent_dir, parent, parent_meta = None, None, None
    if top.get("from_adapter"):
        parent_dir, parent, parent_meta, config = continued_adapter(method, config, top)
    chain = stacked_on(method, top, quantize, parent_meta)  # train --on: the frozen bottoms, checked now
    if chain and objective.head != CAUSAL_LM:  # scoring loads a reward adapter alone: it would lose its bottom
        raise ConfigError(f"--on {chain[-1].ref}: objective {objective.name!r} trains a {objective.head} model, which "
                          "is scored without bottoms; train it on the base (drop --on)")

    use_threads(options.threads)  # torch's default (one per core) collapses beside other work
    base = load_base(top["base"], quantize, dtype=top.get("dtype") or "auto", head=objective.head)
    if parent_meta is not None:
        check_base(parent_meta, base.fingerprint, where=str(top["from_adapter"]),
                   advice="continue it on the base it was trained on (--base DIR), or drop --from to train a "
                          "new adapter on this base")  # train has no --allow-base-mismatch: only merge does
    fold_bottoms(base, chain, top.get("registry"))
    seed_everything(options.seed)  # before the adapter is created: its initial weights are random
    job = TrainingJob(
        method=method, method_config=config, options=options, config=objective_config, base=base, rows=rows,
        data=", ".join(str(s.path) for s in sources) if mixture else str(top["data"]), eval_rows=eval_rows,
        eval_tasks=mixture.eval_tasks if mixture else None,
        callbacks=get_manager().trainer_callbacks(method, options), resume_adapter=parent_dir,
        registry=top.get("registry"),
    )
    result = objective.train(job)
    if not is_main_process():
        return TrainOutcome(directory=None, reference=None, metrics=result.metrics)

    training = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("run_dir", "progress", "threads")}
    if mixture is None:
        data_lineage = {"data": str(top["data"]), "data_sha256": file_sha256(top["data"])}
    else:  # each file's digest beside its weight, share and counts
        files = [{**f, "sha256": file_sha256(f["path"])} for f in mixture.lineage["files"]]
        data_lineage = {"data": [f["path"] for f in files], "data_mixture": {**mixture.lineage, "files": files}}
    training.update({**data_lineage, "quantize": quantize, "dtype": base.dtype, "examples": len(rows)})
    training["objective"] = {"name": objective.name, "config": objective_config.to_dict(), **objective.lineage(job)}
    if options.eval_data:
        training["eval_data_sha256"] = file_sha256(options.eval_data)
    if eval_rows is not None:
        training["eval_examples"] = len(eval_rows)
    out_dir = Path(top["output"]) if top.get("output") else Path(tempfile.mkdtemp(prefix="adapterhub-adapter-"))
    save_adapter(
        method, result.model, config, out_dir,
        base={"name": str(top["base"]), "fingerprint": base.fingerprint},
        training=training, metrics=result.metrics, parent=parent, requires=requirement_of(chain),
    )
    objective.save_extra(result.model, out_dir)
    reference = None
    if not top.get("no_publish"):
        manifest = open_registry(top.get("registry")).publish(top["task"], out_dir, parent=parent)
        reference = f"{manifest.task}@{manifest.version}"
        if not top.get("output"):
            shutil.rmtree(out_dir, ignore_errors=True)
    return TrainOutcome(directory=out_dir, reference=reference, metrics=result.metrics)


def file_sha256(path: str | os.PathLike) -> str:
    """The data file's digest, recorded in the adapter's lineage."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def continued_adapter(method: Any, config: Any, top: dict[str, Any]) -> tuple[Path, str, Any, Any]:
    """For ``--from``: the parent's directory, reference, metadata (None: a plain PEFT dir) and config.

    Incremental fine-tuning keeps the parent's method and config (its weights have that shape), so a
    ``--set`` that contradicts the parent is refused rather than silently ignored.
    """

    directory, reference = resolve_adapter_dir(top["from_adapter"], top.get("registry"))
    meta = adapter_metadata(directory)
    if meta is not None and meta.method != method.name:
        raise ConfigError(
            f"--from {top['from_adapter']} is a {meta.method!r} adapter; continue it with --plugin {meta.method}"
        )
    if meta is not None and meta.method_config:
        parent_config = method.make_config(meta.method_config)
        if config != parent_config and config != method.make_config({}):
            changed = sorted(k for k, v in config.to_dict().items() if parent_config.to_dict().get(k) != v)
            raise ConfigError(
                f"--from {top['from_adapter']}: continued training keeps the parent's method config, but "
                f"{', '.join(changed)} differ; drop those --set values or train a fresh adapter"
            )
        config = parent_config
    return directory, reference or str(top["from_adapter"]), meta, config


def stacked_on(method: Any, top: dict[str, Any], quantize: str, parent_meta: Any) -> list[Any]:
    """The bottoms to fold under this run (``--on``), deepest first; empty for a plain run.

    Continuing (``--from``) a top keeps its bottom: the top learned against it. ``--on`` naming
    another version is refused; a top trained without one may be continued on one.
    """
    inherited = tuple(getattr(parent_meta, "requires", ()) or ())
    on = top.get("on_adapter") or (inherited[0].ref if inherited else None)
    if not on:
        return []
    if inherited and open_registry(top.get("registry")).manifest(on).requirement() != inherited[0]:
        raise ConfigError(f"--from {top['from_adapter']} was trained on top of {inherited[0].ref}; continue it on "
                          f"that one (drop --on {on}), or train a fresh adapter --on {on}")
    return plan_bottoms(on, top.get("registry"), method, quantize)


def merge_to_directory(adapter: str, base_dir: str, out: str, *, registry: str | None = None,
                       allow_base_mismatch: bool = False, dtype: str = "auto") -> Path:
    """Merge an adapter into the full-precision base and save a plain HF model directory.

    An adapter trained ``--on`` others is merged with them below it (the model it is served as).
    The merge runs in float32; the model is written in ``dtype`` (auto: the base checkpoint's own).
    """
    import torch

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise ConfigError(f"--out {out_path} exists and is not empty; choose a new directory")
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    directory, reference = resolve_adapter_dir(adapter, registry)
    chain = bottoms_of(adapter_metadata(directory), reference or str(adapter), registry)  # trained --on them
    base = load_base(base_dir, "none", dtype="float32")
    out_dtype = dtype if dtype != "auto" else (saved_dtype(base.directory) or "float32")
    fold_bottoms(base, chain, registry)  # the model the top was trained in and is served in
    method, model = load_adapter(base.model, directory, base_fingerprint=base.fingerprint,
                                 allow_base_mismatch=allow_base_mismatch)
    method.merge(model)
    merged = method.detach(model)  # adapter modules removed, merged weights kept
    merged.to(getattr(torch, out_dtype))
    merged.config.dtype = out_dtype
    merged.save_pretrained(out_path, safe_serialization=True)
    base.tokenizer.save_pretrained(out_path)
    return out_path
