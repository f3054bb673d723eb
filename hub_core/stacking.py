"""``train --on REF``: a new adapter trained on top of frozen published ones (a shared bottom).

The top must learn against the model the server will run it in: the base with its bottoms
composed at weight 1 (the server brings them with it, see ``serve/requires.py``). Training folds
the bottoms into this run's own copy of the base weights with each method's ``merge`` (as
LLaMA-Factory does with ``adapter_name_or_path`` + ``create_new_adapter``) and attaches the top
to that: frozen by construction, no second adapter in the optimizer, and any objective and top
method train as they always do. For additive bottoms (the LoRA family) the folded forward is the
server's sum up to rounding; ``tests/test_shared_bottom.py`` holds the two side by side.

So a bottom must be mergeable and composable, and its change must add to a layer's output whatever
else is applied (``Method.foldable_bottom``: LoRA, AdaLoRA, BitFit; not IA3, whose input scale
the server applies to a top's delta too, nor DoRA, whose magnitude does); the top must be
composable, and the base unquantized (merging into 4/8-bit weights rounds the bottom away).
Everything is checked before the base loads.
"""

from __future__ import annotations

import types
from typing import Any

from adapterhub.registry import open_registry
from adapterhub.registry.manifest import Manifest
from adapterhub.registry.requires import bottoms, required_version

from .adapters import load_adapter
from .errors import ConfigError, NotFound
from .manager import get_manager
from .metadata import Requirement, check_base


def plan_bottoms(on: str, registry: Any, method: Any, quantize: str) -> list[Manifest]:
    """The versions to fold under the top, deepest first (``on`` itself, pinned, last)."""
    if not method.capabilities.composable:
        raise ConfigError(f"--on {on}: method {method.name!r} cannot be composed with other adapters when served "
                          "(composable: no), so its adapter could never be served with its bottom; train the top "
                          "with a composable method (adapterhub plugins)")
    if quantize != "none":
        raise ConfigError(f"--on {on}: the bottom is merged into this run's copy of the base weights, which a "
                          f"{quantize} base would round it away in; train with --quantize none (the server may still "
                          "serve the pair on a quantized base)")
    store = open_registry(registry)
    try:
        bottom = store.manifest(on)  # a tag resolves now: the top records the version it trained on
    except NotFound as exc:
        raise NotFound(f"--on {on}: {exc}; name a published version (adapterhub registry list)") from None
    chain = [*bottoms(store, bottom), bottom]
    manager = get_manager()
    for manifest in chain:
        bottom_method = manager.get_method(manifest.method)
        where = on if manifest is bottom else f"{on} (through its requirement {manifest.ref})"
        if not bottom_method.capabilities.composable:
            raise ConfigError(f"--on {where}: {manifest.ref} is a {manifest.method!r} adapter, which the server "
                              "cannot compose with another (composable: no); put a composable adapter (lora, ia3, "
                              "...) at the bottom, or continue this one with --from instead")
        if not (bottom_method.capabilities.mergeable and bottom_method.foldable_bottom):
            why = ("cannot merge" if not bottom_method.capabilities.mergeable else
                   "merges into a model other than the one the server composes with a top (foldable_bottom: no)")
            raise ConfigError(f"--on {where}: {manifest.ref} is a {manifest.method!r} adapter, which {why}; training "
                              "on top of a bottom folds it into the base weights, so the bottom must be a method "
                              f"that declares foldable_bottom ({', '.join(foldable_methods(manager))})")
    return chain


def foldable_methods(manager: Any) -> list[str]:
    return [name for name, m in manager.methods().items() if m.foldable_bottom and m.capabilities.mergeable
            and m.capabilities.composable]


def requirement_of(chain: list[Manifest]) -> tuple[Requirement, ...]:
    """What the top records: its direct bottom, pinned, with its digest (the rest follows from it)."""
    return (chain[-1].requirement(),) if chain else ()


def bottoms_of(meta: Any, name: str, registry: Any) -> list[Manifest]:
    """What an adapter's ``adapterhub.json`` requires, deepest first, each once: the versions
    ``merge`` folds in before it (``name``: how messages call the adapter)."""
    if meta is None or not meta.requires:
        return []
    store = open_registry(registry)
    by = types.SimpleNamespace(ref=name, task=name.partition("@")[0], base_fingerprint=meta.base_fingerprint)
    chain: list[Manifest] = []
    for requirement in meta.requires:
        bottom = required_version(store, requirement, by)
        chain += [m for m in (*bottoms(store, bottom), bottom) if m.ref not in {c.ref for c in chain}]
    return chain


def fold_bottoms(base: Any, chain: list[Manifest], registry: Any) -> None:
    """Merge each bottom, deepest first, into ``base.model``'s weights, leaving a plain model."""
    store = open_registry(registry)
    for manifest in chain:
        check_base(manifest, base.fingerprint, where=manifest.ref,
                   advice="train on the base it was trained on (--base DIR), or put the top on a bottom of this base")
        method, model = load_adapter(base.model, store.materialize(manifest), base_fingerprint=base.fingerprint)
        method.merge(model)
        base.model = method.detach(model)  # adapter modules gone, merged weights kept
