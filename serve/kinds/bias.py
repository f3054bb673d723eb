"""Bias changes (``BiasForm``, BitFit): per-row vectors gathered from a stack and added to a
module's output, first of all kinds (they are part of the layer's own affine map)."""

from __future__ import annotations

from typing import Any

import torch

from adapterhub.serving_forms import BiasForm

from .base import Part, Slots, StackedKind, write_parts


class BiasKind(StackedKind):
    name = "bias"
    form_type = BiasForm

    def write(self, stack: Any, slot: int, form: BiasForm) -> None:
        write_parts(stack, slot, {m: (b.detach(),) for m, b in form.biases.items()})

    def part(self, slots: Slots, stack: Any, backend: Any, rows: int, device: Any) -> Part:
        return BiasPart(slots, stack.tensors)


class BiasPart(Part):
    def __init__(self, slots: Slots, tensors: dict[str, list[torch.Tensor]]):
        self.slots, self.tensors = slots, tensors
        self.output_modules = frozenset(tensors)

    def after(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        s = self.slots
        b = (self.tensors[module][0][s.index] * s.weight[:, :, None]).sum(dim=1)  # [B, out]
        return out + b[:, None, :].to(out.dtype)
