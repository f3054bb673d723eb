"""Versions trained on top of other versions (``train --on``): following, checking and guarding them.

A version's manifest may name, under ``requires``, the pinned versions it was trained on top of,
each with its digest. Whoever uses such a version (the server composing it, a continued training)
needs the whole chain below it, deepest first; this module walks it once for all of them and
refuses, by name and with the fix, what would give a model other than the one the top learned
against: a required version missing from the registry, one whose content differs from what was
recorded (another adapter published or imported under that reference), one trained on another
base, and a cycle (impossible with immutable versions, possible in a hand-edited or imported
manifest). Whether a method can be composed at all is the caller's question (it needs the plugins).

Registry-only and torch-free: training, serving and the registry's own ``rm`` use it.
"""

from __future__ import annotations

import types
from typing import Any, Iterator

from adapterhub.errors import ConfigError, IntegrityError, NotFound
from adapterhub.metadata import Requirement

from .manifest import Manifest

MAX_DEPTH = 16  # a chain deeper than this is a mistake, not a model


def bottoms(store: Any, top: Manifest) -> list[Manifest]:
    """Every version ``top`` requires, directly or through others, deepest first, each once."""
    ordered: list[Manifest] = []
    _walk(store, top, (top.ref,), ordered, {top.ref})
    return ordered


def _walk(store: Any, manifest: Manifest, path: tuple[str, ...], ordered: list[Manifest], seen: set[str]) -> None:
    for requirement in manifest.requires:
        if requirement.ref in path:
            cycle = " -> ".join((*path, requirement.ref))
            raise ConfigError(f"{path[0]} cannot be used: its requirements form a cycle ({cycle}); a published version "
                              f"never requires itself, so a manifest was edited or imported by hand: republish "
                              f"{manifest.ref} without that requirement")
        if len(path) >= MAX_DEPTH:
            raise ConfigError(f"{path[0]} requires versions more than {MAX_DEPTH} deep ({' -> '.join(path)}); "
                              "merge some of them and train the top again")
        bottom = required_version(store, requirement, manifest, top=path[0])
        if requirement.ref in seen:
            continue
        _walk(store, bottom, (*path, requirement.ref), ordered, seen)
        seen.add(requirement.ref)
        ordered.append(bottom)


def required_version(store: Any, requirement: Requirement, by: Any, *, top: str | None = None) -> Manifest:
    """The manifest ``requirement`` names, checked to be what ``by`` (a manifest: ``ref``, ``task``,
    ``base_fingerprint``) was trained on."""
    via = f"{top} (through {by.ref})" if top and top != by.ref else by.ref
    try:
        bottom = store.manifest(requirement.ref)
    except NotFound:
        raise NotFound(f"{via} requires {requirement.ref}, which is not in registry {store.location}; publish or "
                       f"import {requirement.ref} there (or pull it with {by.ref}), or retrain {by.task} without "
                       f"--on") from None
    if bottom.digest != requirement.digest:
        raise ConfigError(f"{via} requires {requirement.ref} with digest {requirement.digest[:12]}, but this "
                          f"registry's {requirement.ref} is another adapter (digest {bottom.digest[:12]}); import "
                          f"the {requirement.ref} it was trained on, or retrain {by.task} --on this one")
    if bottom.base_fingerprint and by.base_fingerprint and bottom.base_fingerprint != by.base_fingerprint:
        raise ConfigError(f"{via} requires {requirement.ref}, which was trained on another base "
                          f"({bottom.base_fingerprint}, not {by.base_fingerprint}); retrain {by.task} --on a "
                          f"version trained on its base")
    return bottom


def check_requirements(store: Any, requires: tuple[Requirement, ...], task: str, base_fingerprint: str) -> None:
    """Before a publish writes anything: every required version is here, as recorded, on the same base."""
    if not requires:
        return
    pending = types.SimpleNamespace(ref=f"the new version of {task}", task=task, base_fingerprint=base_fingerprint)
    for requirement in requires:
        bottom = required_version(store, requirement, pending)
        bottoms(store, bottom)  # its own chain resolves (no cycle, nothing missing)


def dependents(store: Any, ref: Any) -> list[str]:
    """Published versions that require ``ref`` directly (``rm`` refuses to strand them)."""
    target = store.manifest(ref).ref
    return [m.ref for m in _every_manifest(store) if any(r.ref == target for r in m.requires)]


def _every_manifest(store: Any) -> Iterator[Manifest]:
    for task in store.list_tasks():
        for version in store.list_versions(task):
            try:
                yield store.get_manifest(task, version)
            except (NotFound, IntegrityError):
                continue  # gone meanwhile, or damaged (verify reports it)
