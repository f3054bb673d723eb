"""The OpenAI ``model`` field: which base and adapters a request names, in one string.

Grammar (no registry name has ``+`` or ``:``, so both are free to separate)::

    model      = BASE | composition
    composition = term ("+" term)*          e.g. sentiment@3+style@prod:0.5
    term       = REF [":" WEIGHT]           REF = task | task@N | task@tag; WEIGHT defaults to 1

``BASE`` is the server's served model name (or the base as given to ``--base``): the base alone.
A response's ``model`` is the composition as it resolved (tags replaced by their versions), so a
client can log exactly what answered.
"""

from __future__ import annotations

import math
from typing import Sequence

from adapterhub.errors import ConfigError

from .requests import ResolvedAdapter


def parse_model(model: str, base_names: Sequence[str]) -> list[tuple[str, float]]:
    """``model`` -> [(ref, weight), ...]; [] for the base alone. Errors name the term and the rule."""
    model = model.strip()
    if not model:
        raise ConfigError(f"model is empty; name the base ({base_names[0]!r}) or adapters, e.g. 'task@prod'")
    if model in base_names:
        return []
    return parse_composition(model, "model")


def parse_composition(text: str, field: str) -> list[tuple[str, float]]:
    """``a@1+b@prod:0.5`` -> [(a@1, 1.0), (b@prod, 0.5)]: the grammar above, shared by the HTTP
    ``model`` and ``adapterhub generate --adapter`` (``field`` names where the text came from)."""
    adapters = []
    for term in text.split("+"):
        ref, sep, weight = term.strip().partition(":")
        ref = ref.strip()
        if not ref:
            raise ConfigError(f"{field} {text!r}: an empty adapter between '+'; write e.g. 'a@1+b@prod:0.5'")
        if not sep:
            adapters.append((ref, 1.0))
            continue
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"{field} {text!r}: the weight {weight.strip()!r} of {ref} is not a number; "
                              f"write REF:WEIGHT, e.g. {ref}:0.5") from None
        if not math.isfinite(value):
            raise ConfigError(f"{field} {text!r}: the weight of {ref} must be a finite number")
        if value == 0:
            raise ConfigError(f"{field} {text!r}: the weight of {ref} is 0, which turns it off; leave {ref} out")
        adapters.append((ref, value))
    return adapters


def resolved_model(adapters: Sequence[ResolvedAdapter], base_name: str) -> str:
    """The composition a request resolved to, in the grammar above (the base name when none)."""
    if not adapters:
        return base_name
    return "+".join(a.resolved if a.weight == 1.0 else f"{a.resolved}:{a.weight:g}" for a in adapters)


def unknown_model(model: str, error: Exception, base_name: str) -> str:
    """A ``model`` the registry does not know, in words that say what this server does serve."""
    return (f"model {model!r} is not served here ({error}); this server serves the base {base_name!r} and the "
            f"registry's adapters on it, alone or composed (GET /v1/models lists them)")
