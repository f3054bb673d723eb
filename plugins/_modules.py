"""Shared plumbing for the methods we implement ourselves (adapter, bitfit, freeze, full).

Three things live here once:

- the on-disk format: ``adapter_model.safetensors`` (a named subset of tensors) and our own
  ``adapter_config.json`` (``{"adapter_type": ..., **config}``);
- finding the modules a method targets, by base-model module names;
- :class:`WeightOverlay`, which keeps a saved change to some base parameters *apart* from them, so
  that a loaded adapter can be merged (folded into the weights) and unmerged (originals restored
  bit for bit) like a LoRA, even for methods whose adapter is "new values for base weights".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterhub import architectures as A
from adapterhub.adapter_files import AdapterFiles
from adapterhub.errors import ConfigError, MergeError, NotFound

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


# -- files ---------------------------------------------------------------------------------------


def write_adapter(directory: str | Path, adapter_type: str, config: dict[str, Any],
                  tensors: dict[str, torch.Tensor] | None, *, config_file: str = CONFIG_FILE) -> None:
    """Write ``adapter_config.json`` and (unless ``tensors`` is None) the safetensors weights."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(plain, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / config_file).write_text(json.dumps({"adapter_type": adapter_type, **config}, indent=2) + "\n")


def read_config(directory: str | Path | AdapterFiles, adapter_type: str, *,
                config_file: str = CONFIG_FILE) -> dict[str, Any]:
    """The config stored in ``directory`` (or the serving hook's files), without ``adapter_type``,
    checked to be ours."""
    if isinstance(directory, AdapterFiles):
        path, stored = config_file, dict(directory.read_json(config_file))
    else:
        path = Path(directory) / config_file
        if not path.is_file():
            raise NotFound(f"{path} does not exist; is {directory} a saved {adapter_type!r} adapter?")
        stored = json.loads(path.read_text())
    found = stored.pop("adapter_type", None)
    if found != adapter_type:
        raise ConfigError(
            f"{path} holds a {found!r} adapter, not {adapter_type!r}; load it with the method that saved it"
        )
    return stored


def read_tensors(directory: str | Path, device: Any = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise NotFound(f"{path} does not exist; the adapter directory is incomplete")
    return load_file(str(path), device=str(device) if device is not None else "cpu")


# -- targets -------------------------------------------------------------------------------------


def decoder_linears(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the Linear-like layers inside decoder layers, in order.

    Decoder layers and Linear-like layers (``nn.Linear``, bitsandbytes' layers, GPT-2's ``Conv1D``)
    are found by :mod:`adapterhub.architectures`, so ``transformer.h.0.attn.c_attn`` counts as
    well as ``model.layers.0.self_attn.q_proj``. ``targets``: ``["all-linear"]`` for every one,
    else name suffixes such as ``q_proj`` or ``mlp.down_proj``. Adapter modules we add (children
    of a base Linear) are never targets.
    """
    targets = list(targets)
    found = []
    for prefix, layer in A.decoder_layers(model):
        for local, module in layer.named_modules():
            if not local or A.linear_shape(module) is None:
                continue
            parent = local.rpartition(".")[0]
            if parent and A.linear_shape(layer.get_submodule(parent)) is not None:
                continue  # a Linear inside one of our adapters
            name = f"{prefix}.{local}"
            if targets == ["all-linear"] or any(name == t or name.endswith("." + t) for t in targets):
                found.append((name, module))
    return found


def out_features(module: nn.Module) -> int:
    """Output width of a Linear-like module (``nn.Linear``, bitsandbytes, ``Conv1D``)."""
    shape = A.linear_shape(module)
    if shape is None:
        raise ConfigError(f"{type(module).__name__} is not a Linear layer; adapters attach to Linear layers only")
    return shape[1]


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def check_finite(method: str, name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise MergeError(f"{method}: refusing to merge, {name} would become non-finite; the adapter is corrupt")


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters) counted by unique tensor."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


# -- overlays ------------------------------------------------------------------------------------

OVERLAY = "adapterhub_overlay"


class WeightOverlay(nn.Module):
    """A change to the parameters of one module (its owner), kept apart from them.

    Unmerged, a forward hook on the owner adds the change to the owner's output: for a Linear,
    ``x @ dW.T + db`` (exact, no recomputation); for anything else (norms, embeddings) the owner is
    re-run with ``param + delta`` through ``torch.func.functional_call``. Merged, the change is in
    the owner's parameters and the originals are kept here, so unmerge restores them bit for bit.
    A freshly attached overlay for training starts merged with no delta: the parameters train in
    place and the delta is ``param - original`` when it is needed.
    """

    def __init__(self, owner: nn.Module, names: Iterable[str]):
        super().__init__()
        self.names = tuple(names)
        self.merged = False
        self._busy = False
        for n in self.names:
            for kind in ("delta", "original", "exact"):
                self.register_buffer(f"{kind}_{n}", None, persistent=False)
        owner.add_module(OVERLAY, self)
        self.handle = owner.register_forward_hook(self._hook, with_kwargs=True)

    def buffer(self, kind: str, name: str) -> torch.Tensor | None:
        return getattr(self, f"{kind}_{name}", None)

    def set_buffer(self, kind: str, name: str, value: torch.Tensor | None) -> None:
        setattr(self, f"{kind}_{name}", value)

    def delta(self, owner: nn.Module, name: str) -> torch.Tensor:
        stored = self.buffer("delta", name)
        if stored is not None:
            return stored
        return getattr(owner, name).detach() - self.buffer("original", name)

    def _hook(self, owner: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.merged or self._busy:
            return None
        if isinstance(owner, nn.Linear) and set(self.names) <= {"weight", "bias"}:
            x = args[0] if args else kwargs["input"]
            dw, db = self.buffer("delta", "weight"), self.buffer("delta", "bias")
            extra = F.linear(x, dw.to(x.dtype)) if dw is not None else 0
            return output + extra + (db.to(output.dtype) if db is not None else 0)
        self._busy = True
        try:
            values = {n: getattr(owner, n) + self.buffer("delta", n) for n in self.names}
            return torch.func.functional_call(owner, values, args, kwargs)
        finally:
            self._busy = False


def overlays(model: nn.Module) -> list[tuple[nn.Module, WeightOverlay]]:
    return [(m, ov) for m in model.modules() if isinstance(ov := getattr(m, OVERLAY, None), WeightOverlay)]


def _owners(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[nn.Module, list[str]]]:
    """Group parameter names by owning module: ``a.b.weight`` -> (module ``a.b``, ["weight"])."""
    grouped: dict[str, tuple[nn.Module, list[str]]] = {}
    for full in names:
        prefix, _, local = full.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        grouped.setdefault(prefix, (owner, []))[1].append(local)
    return grouped


def attach_live(model: nn.Module, names: Iterable[str]) -> None:
    """Overlays for training in place: originals recorded, parameters made trainable."""
    for owner, locals_ in _owners(model, names).values():
        ov = WeightOverlay(owner, locals_)
        for n in locals_:
            p = getattr(owner, n)
            ov.set_buffer("original", n, p.detach().clone())
            p.requires_grad_(True)
        ov.merged = True


def attach_deltas(model: nn.Module, deltas: dict[str, torch.Tensor],
                  exact: dict[str, torch.Tensor] | None = None) -> None:
    """Unmerged overlays holding ``deltas`` (and, optionally, the exact values merge writes)."""
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    params = dict(model.named_parameters(remove_duplicate=False))
    expanded, exact_expanded = {}, {}
    for name, delta in deltas.items():
        if name not in params:
            raise ConfigError(f"the adapter changes parameter {name!r}, which this base does not have; "
                              "load it on the base it was trained on")
        for alias in aliases[id(params[name])]:  # tied weights: every user sees the change
            expanded[alias] = delta
            if exact is not None:
                exact_expanded[alias] = exact[name]
    for owner, locals_ in _owners(model, expanded).values():
        ov = WeightOverlay(owner, locals_)
        prefix = next(k for k, m in model.named_modules() if m is owner)
        for n in locals_:
            key = f"{prefix}.{n}" if prefix else n
            device = getattr(owner, n).device
            ov.set_buffer("delta", n, expanded[key].to(device))
            if key in exact_expanded:
                ov.set_buffer("exact", n, exact_expanded[key].to(device))


def current_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> change, whether the overlays are merged, unmerged or training live."""
    prefixes = {id(m): n for n, m in model.named_modules()}
    out, seen = {}, set()
    for owner, ov in overlays(model):
        for n in ov.names:
            if id(getattr(owner, n)) in seen:
                continue
            seen.add(id(getattr(owner, n)))
            prefix = prefixes[id(owner)]
            out[f"{prefix}.{n}" if prefix else n] = ov.delta(owner, n)
    return out


@torch.no_grad()
def merge_overlays(model: nn.Module, method: str) -> None:
    found = overlays(model)
    if not found:
        raise MergeError(f"{method}: no loaded adapter to merge; load one with `load()` first")
    if any(ov.merged for _, ov in found):
        raise MergeError(f"{method}: the adapter is already merged (or is training in place); unmerge it first")
    plan, seen = [], set()
    for owner, ov in found:
        for n in ov.names:
            p = getattr(owner, n)
            if id(p) in seen:
                continue
            seen.add(id(p))
            exact = ov.buffer("exact", n)
            new = exact if exact is not None else p + ov.buffer("delta", n)
            check_finite(method, n, new)
            plan.append((ov, n, p, new))
    for ov, n, p, new in plan:  # nothing is written until every new value is known to be finite
        ov.set_buffer("original", n, p.detach().clone())
        p.copy_(new)
    for _, ov in found:
        ov.merged = True


@torch.no_grad()
def unmerge_overlays(model: nn.Module, method: str) -> None:
    found = [(o, ov) for o, ov in overlays(model) if ov.merged]
    if not found:
        raise MergeError(f"{method}: nothing to unmerge; the adapter is not merged")
    for owner, ov in found:
        for n in ov.names:
            original = ov.buffer("original", n)
            if original is None:
                continue  # a tied parameter restored through its other owner
            p = getattr(owner, n)
            if ov.buffer("delta", n) is None:
                ov.set_buffer("delta", n, p.detach() - original)
            p.copy_(original)
            ov.set_buffer("original", n, None)
        ov.merged = False


def remove_overlays(model: nn.Module) -> nn.Module:
    """Drop every overlay; parameters keep what they hold (merged values stay merged)."""
    for owner, ov in overlays(model):
        ov.handle.remove()
        delattr(owner, OVERLAY)
    return model
