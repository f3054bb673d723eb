"""Bottleneck adapters (``BottleneckForm``): ``h + w * up(act(down(h)))`` after a module, per row.

Stacked like LoRA, gathered per row, applied after the module's output (and after any LoRA delta
on it) in the request's order: a loop over slot positions of a composition, not over adapters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adapterhub.errors import LimitExceeded
from adapterhub.serving_forms import BottleneckForm

from .base import Part, Slots, StackedKind, write_parts

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


class BottleneckKind(StackedKind):
    name = "bottleneck"
    form_type = BottleneckForm

    def admit(self, pool: Any, key: str, form: BottleneckForm) -> Any:
        if form.activation not in ACTIVATIONS:
            raise LimitExceeded(f"bottleneck activation {form.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        return super().admit(pool, key, form)

    def write(self, stack: Any, slot: int, form: BottleneckForm) -> None:
        write_parts(stack, slot, {m: tuple(t.detach() for t in ts) for m, ts in form.layers.items()})
        stack.meta[slot] = form.activation

    def part(self, slots: Slots, stack: Any, backend: Any, rows: int, device: Any) -> Part:
        return BottleneckPart(slots, stack.tensors, dict(stack.meta))


class BottleneckPart(Part):
    def __init__(self, slots: Slots, tensors: dict[str, list[torch.Tensor]], activations: dict[int, str]):
        self.slots, self.tensors, self.activations = slots, tensors, activations
        self.output_modules = frozenset(tensors)

    def after(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        D, Db, U, Ub = self.tensors[module]
        s = self.slots
        for k in range(s.index.shape[1]):  # in the request's order
            idx = s.index[:, k]
            z = torch.einsum("bth,brh->btr", out.to(D.dtype), D[idx]) + Db[idx][:, None, :]
            z = _activate(z, [self.activations.get(row[k], "") for row in s.host_index])
            up = torch.einsum("btr,bhr->bth", z, U[idx]) + Ub[idx][:, None, :]
            out = out + (up * s.weight[:, k, None, None]).to(out.dtype)
        return out


def _activate(z: torch.Tensor, names: list[str]) -> torch.Tensor:
    if len(set(names)) == 1:
        return _act(names[0], z)
    out = z.clone()
    for name in set(names):
        rows = torch.tensor([n == name for n in names], device=z.device)
        out[rows] = _act(name, z[rows])
    return out


def _act(name: str, z: torch.Tensor) -> torch.Tensor:
    return z if name == "" else getattr(F, name)(z)
