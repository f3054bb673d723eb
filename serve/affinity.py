"""A request's adapters pinned to immutable versions, and the routing key that names what it needs.

Routing by the ``model`` string would be wrong twice: ``task@prod`` names different weights after a
tag moves (a replica holding the old ones would look like a hit), and ``a@1+b@1`` names nothing a
cache holds. So the front of a fleet resolves every reference now, rewrites the request to the
versions it resolved (``task@prod`` -> ``task@3``: the replica then loads exactly those, even if
the tag moves again meanwhile), and keys it by what those versions ARE: each one's file digests,
method and method config, with its weight, in order (bottleneck adapters apply in order). Two
requests share a key exactly when they need the same weights applied the same way.

The request is parsed by the HTTP door's own schemas; anything they refuse is left for the door to
answer, so a fleet reports errors exactly as one server does. No Ray here: this module is pure.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
from typing import Sequence

from .adapter_source import AdapterSource
from .openai_schema import ChatBody, CompletionBody
from .requests import AdapterSpec
from .requires import with_bottoms

BODIES = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody}


@dataclasses.dataclass(frozen=True)
class Pinned:
    """What a request needs: ``key`` (empty for the base alone) and its versions with weights."""

    key: str
    adapters: tuple[tuple[str, float], ...]

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(ref for ref, _ in self.adapters)


BASE_ONLY = Pinned("", ())
# The versions a replica is about to load for a key: Ray's multiplexed loader gets the key alone, and
# runs in the requesting task, so it reads them here. (Here, not in ray_app: Ray Serve pickles the
# deployment classes by value, and a ContextVar does not pickle.)
LOADING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("loading")


def pin(adapters: Sequence[tuple[str, float]], source: AdapterSource) -> Pinned:
    """Resolve each reference now; NotFound / InvalidReference propagate (the caller decides)."""
    pinned, material = [], []
    # as GenerationRequest.build reads a zero weight; bottoms (train --on) join as the engine adds them
    specs = [AdapterSpec(ref, 1.0 if weight == 0 else float(weight)) for ref, weight in adapters]
    for _, spec in with_bottoms(specs, source):
        weight = spec.weight
        manifest = source.resolve(spec.ref).manifest
        pinned.append((manifest.ref, weight))
        material.append({"method": manifest.method, "method_config": manifest.method_config,
                         "files": {name: entry.sha256 for name, entry in manifest.files.items()}, "weight": weight})
    if not pinned:
        return BASE_ONLY
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return Pinned(hashlib.sha256(canonical.encode()).hexdigest(), tuple(pinned))


def pin_body(path: str, body: bytes, base_names: Sequence[str], source: AdapterSource) -> tuple[bytes, Pinned]:
    """``body`` rewritten to pinned versions, and its key.

    Raises when the door's schema refuses the body or a reference does not resolve: the caller then
    sends the body unchanged and lets the door answer it.
    """
    data = json.loads(body)
    request = BODIES[path].model_validate(data)
    found = pin(request.adapter_list(base_names), source)
    if not found.adapters:
        return body, BASE_ONLY
    if data.get("adapters") is not None:
        data["adapters"] = [{"ref": ref, "weight": weight} for ref, weight in found.adapters]
    else:
        data["model"] = composition(found.adapters)
    return json.dumps(data, ensure_ascii=False).encode(), found


def composition(adapters: Sequence[tuple[str, float]]) -> str:
    """The ``model`` grammar for pinned versions (``repr`` of a weight reads back to the same float)."""
    return "+".join(ref if weight == 1.0 else f"{ref}:{weight!r}" for ref, weight in adapters)
