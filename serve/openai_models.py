"""``GET /v1/models``: the base, then every version trained on it and every tag, one page at a time.

Each adapter has ``parent`` = the base (vLLM's convention); one trained on top of others
(``train --on``) lists them under ``requires``: a request for it is served with them below it.
A page ends after ``limit`` entries; the next starts after the id named by ``after`` (the last id
of the previous page). The registry's catalog is lazy, so a page reads only the manifests up to
its end.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

from adapterhub.errors import ConfigError


def list_models(source: Any, fingerprint: str, served_name: str, started: int, limit: int,
                after: str | None) -> dict[str, Any]:
    """One page of the list (blocking: it reads the registry)."""
    base = {"id": served_name, "object": "model", "created": started, "owned_by": "adapterhub",
            "root": served_name, "parent": None}  # not the base's directory: a path of this server
    catalog = ((name, {"id": name, "object": "model", "created": _epoch(v.manifest.created), "owned_by": "adapterhub",
                       "root": v.ref, "parent": served_name, "method": v.method, **_requires(v.manifest)})
               for name, v in source.catalog(fingerprint))
    data, seen, more = [], after is None, False
    for name, entry in itertools.chain([(served_name, base)], catalog):
        if not seen:
            seen = name == after
            continue
        if len(data) == limit:
            more = True
            break
        data.append(entry)
    if not seen:
        raise ConfigError(f"after={after!r} is not a model id of this server; pass the last id of the previous page")
    return {"object": "list", "data": data, "has_more": more}


def _requires(manifest: Any) -> dict[str, Any]:
    """A version trained on top of others (train --on) says which: asking for it brings them too."""
    return {"requires": [r.ref for r in manifest.requires]} if manifest.requires else {}


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
