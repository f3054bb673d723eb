"""A request's adapters with the bottoms they were trained on (``train --on``) brought in.

An adapter trained on top of others learned against the base with those composed below it, so a
request for ``topic@1`` is served as the composition ``shared@1+topic@1``: its bottoms (deepest
first, each at weight 1) in front of it, the stack pinned now (a tag moving meanwhile changes
nothing). An adapter without bottoms passes as the client named it (the cache resolves it), so a
tag moved in between onto a version with bottoms would be served without them once: the window
of two manifest reads. A bottom the request already names, by the same version, is not added twice:
the request's own weight and place for it win. What cannot be served so is refused by name
before anything loads: a missing, changed or other-base bottom, a cycle (see
:mod:`adapterhub.registry.requires`), and a bottom or top whose method the server cannot compose.
"""

from __future__ import annotations

from typing import Any, Sequence

from adapterhub.errors import ConfigError
from adapterhub.manager import get_manager

from .adapter_source import AdapterSource
from .requests import AdapterSpec


def with_bottoms(adapters: Sequence[AdapterSpec], source: AdapterSource) -> list[tuple[str, AdapterSpec]]:
    """(what the request called it, the pinned adapter to load) for each adapter to apply, in order."""
    named = []
    for spec in adapters:
        version = source.resolve(spec.ref)
        named.append((spec, version.manifest, source.bottoms(version) if version.manifest.requires else []))
    explicit = {manifest.ref for _, manifest, _ in named}
    expanded: list[tuple[str, AdapterSpec]] = []
    added: set[str] = set()
    for spec, manifest, chain in named:
        if chain:
            check_composable(manifest.ref, [manifest, *chain])
        for bottom in chain:
            if bottom.ref not in explicit and bottom.ref not in added:
                added.add(bottom.ref)
                expanded.append((bottom.ref, AdapterSpec(bottom.ref, 1.0)))
        # a stack is pinned (its bottoms were resolved for this version); a lone adapter keeps the
        # client's reference, so the cache's messages name what the client sent
        expanded.append((spec.ref, AdapterSpec(manifest.ref, spec.weight) if chain else spec))
    return expanded


def check_composable(top: str, manifests: Sequence[Any]) -> None:
    """Every adapter of a stack must compose on this server (a manifest edited by hand could stack
    anything; training refuses such stacks)."""
    manager = get_manager()
    for manifest in manifests:
        if not manager.get_method(manifest.method).capabilities.composable:
            which = "it is" if manifest.ref == top else f"its bottom {manifest.ref} is"
            raise ConfigError(f"{top} cannot be served: it was trained on top of other adapters, and {which} a "
                              f"{manifest.method!r} adapter, which the server cannot compose (composable: no); "
                              f"retrain {top.partition('@')[0]} on a composable bottom")
