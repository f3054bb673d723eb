"""IA3 scales (``ScaleForm``): per-row scale vectors gathered from a stack whose empty slots are ones.

A weight ``w`` scales by ``1 + w (s - 1)``; several in one row multiply. Input scales run in a
forward pre-hook, output scales in the forward hook (before any LoRA delta or bottleneck).
"""

from __future__ import annotations

from typing import Any

import torch

from adapterhub.serving_forms import ScaleForm

from .base import Part, Slots, StackedKind, write_parts


class ScaleKind(StackedKind):
    name = "scale"
    form_type = ScaleForm
    pad = 1.0

    def write(self, stack: Any, slot: int, form: ScaleForm) -> None:
        parts = {f"out:{m}": (v.detach(),) for m, v in form.output_scales.items()}
        parts.update({f"in:{m}": (v.detach(),) for m, v in form.input_scales.items()})
        write_parts(stack, slot, parts)

    def part(self, slots: Slots, stack: Any, backend: Any, rows: int, device: Any) -> Part:
        return ScalePart(slots, stack.tensors)


class ScalePart(Part):
    def __init__(self, slots: Slots, tensors: dict[str, list[torch.Tensor]]):
        self.slots = slots
        self.out = {n[4:]: t[0] for n, t in tensors.items() if n.startswith("out:")}
        self.inp = {n[3:]: t[0] for n, t in tensors.items() if n.startswith("in:")}
        self.output_modules, self.input_modules = frozenset(self.out), frozenset(self.inp)

    def _scale(self, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.slots
        factor = (1 + s.weight[:, :, None] * (S[s.index] - 1)).prod(dim=1)  # [B, dim]
        return t * factor[:, None, :].to(t.dtype)

    def before(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self._scale(self.inp[module], x)

    def after(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self._scale(self.out[module], out)
