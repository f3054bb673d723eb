"""Adapter kinds: how each kind of serving form is stacked, composed and applied to a batch.

One object per kind (:data:`KINDS`, in the order they apply to a module's output), each in a small
module of its own over the contract in :mod:`.base`. The engine, the adapter cache and the batch
plan never ask what kind an adapter is: they hand forms to :meth:`Kind.admit`, per-row adapters to
:meth:`Kind.step`, and apply the step's :class:`Part`. A later kind is one more module and one more
entry here; this module only lists them.
"""

from __future__ import annotations

from typing import Any

from .base import Kind, Part, Served, Slots, StackedKind, check_composition, copy_scaled, region, write_parts
from .bias import BiasKind
from .bottleneck import BottleneckKind
from .dora import DoraKind
from .lora import LoraKind
from .prefix import PrefixKind
from .scale import ScaleKind
from .soft_prompt import SoftPromptKind
from .sparse import SparseKind

__all__ = ["KINDS", "SUPPORTED_FORMS", "Kind", "Part", "Served", "Slots", "StackedKind", "check_composition",
           "copy_scaled", "kind_of", "region", "write_parts"]


def _kinds() -> list[Kind]:
    # the order they apply in a module: the layer's own bias, its output scale, the low-rank and
    # sparse deltas, DoRA's channel scale over base + its delta, then what comes after the layer
    lora = LoraKind()
    return [BiasKind(), ScaleKind(), lora, SparseKind(), DoraKind(lora), BottleneckKind(), PrefixKind(),
            SoftPromptKind()]


KINDS: list[Kind] = _kinds()
_BY_FORM = {kind.form_type: kind for kind in KINDS}
SUPPORTED_FORMS = tuple(_BY_FORM)


def kind_of(form: Any) -> Kind | None:
    return _BY_FORM.get(type(form))
