"""The contract every adapter kind fulfils, and what kinds, the slot pool and the batch plan pass
each other: a kind's :class:`Part` of a step, the :class:`Slots` its rows use, and what an admitted
adapter is (:class:`Served`).

Apart from the package's ``__init__`` (which only lists the kinds), so that each kind's module and
the slot pool import these without importing one another.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from adapterhub.errors import LimitExceeded


@dataclasses.dataclass
class Slots:
    """Per-row slot indices into one kind's stack (0 = none) and weights, ``[B, K]`` (K = the most
    adapters of the kind in one row), on the device and, for plans, on the host."""

    index: torch.Tensor  # [B, K] long
    weight: torch.Tensor  # [B, K] float32
    host_index: list[list[int]]  # what per-step plans are built from, without a device sync
    host_weight: list[list[float]]

    def shared(self) -> int | None:
        """The one slot every row uses (one adapter, weight 1), or None: rows differ or compose."""
        if len(self.host_index[0]) != 1:
            return None
        first = self.host_index[0][0]
        same = all(r == [first] for r in self.host_index) and all(w == [1.0] for w in self.host_weight)
        return first if same else None


@dataclasses.dataclass(eq=False)
class Served:
    """What the cache keeps of a servable adapter: its kind, the key/value positions it puts in front
    of a row's cache (prefixes), the input tokens it puts in front of the row's prompt (soft
    prompts), whatever the kind keeps off the stacks (their device tensors), and every kind whose
    step applies it (DoRA: the LoRA kind's delta, then its own channel scale)."""

    kind: Any
    positions: int = 0
    data: Any = None
    kinds: tuple = ()
    tokens: int = 0

    def __post_init__(self) -> None:
        self.kinds = self.kinds or (self.kind,)


class Part:
    """One kind's share of a step: the modules it hooks and what it does there."""

    output_modules: frozenset[str] = frozenset()  # forward hooks: after(module, x, out)
    input_modules: frozenset[str] = frozenset()  # forward pre-hooks: before(module, x)

    def before(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def after(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    def input_prefix(self) -> list[torch.Tensor | None] | None:
        """Per row, embeddings ``[P, hidden]`` to put in front of its input embeddings (or None)."""
        return None

    def kv_prefix(self, num_layers: int, device: Any) -> tuple[list, torch.Tensor] | None:
        """Per-layer (keys, values) to put in front of the rows' own, and their mask ``[B, P]``."""
        return None

    def drain(self) -> None:
        """The forward pass is over (or raised): wait for anything still running."""


class Kind:
    """A serving form kind. Subclasses set ``name``, ``form_type``, and implement ``admit`` and ``step``."""

    name: str = ""
    form_type: type = object
    stacked = True  # has a stack in the slot pool
    pad = 0.0  # value of empty slots and of padding in its stacks

    def stack_dtype(self, pool: Any) -> torch.dtype | None:
        return None  # the forms' own

    def admit(self, pool: Any, key: str, form: Any) -> Any:
        """Copy ``form``'s tensors to the pool's device (a slot, for stacked kinds); returns a ``Served``."""
        raise NotImplementedError

    def check_weight(self, key: str, weight: float) -> None:
        """Refuse a weight this kind cannot apply (LimitExceeded: INVALID_ARGUMENT)."""

    def check_company(self, key: str, others: Sequence[Any]) -> None:
        """Refuse composing with ``others`` (the request's other adapters' ``Served``) where the maths
        has no defined result (LimitExceeded, saying why)."""

    def step(self, rows: Sequence[Sequence[tuple[str, float, Any]]], pool: Any, device: Any, backend: Any) -> Part | None:
        """This kind's part of a step for ``rows`` (per row: (key, weight, served) of this kind, in
        request order), or None when no row has one."""
        raise NotImplementedError

    def write(self, stack: Any, slot: int, form: Any) -> None:
        """Copy ``form`` into ``slot`` of ``stack`` (stacked kinds), padding the rest."""
        raise NotImplementedError


class StackedKind(Kind):
    """A kind whose tensors live in a stack of the slot pool (float32 unless it says otherwise):
    admitting writes a slot, a step gathers the rows' slots and hands them to :meth:`part`."""

    def stack_dtype(self, pool: Any) -> torch.dtype | None:
        return torch.float32

    def admit(self, pool: Any, key: str, form: Any) -> Any:
        pool.stack(self).admit(key, form)
        return Served(self)

    def step(self, rows, pool, device, backend) -> Part | None:
        stack = pool.stack(self)
        slots = stack.gather([[(key, w) for key, w, _ in row] for row in rows], device)
        return None if slots is None else self.part(slots, stack, backend, len(rows), device)

    def part(self, slots: Any, stack: Any, backend: Any, rows: int, device: Any) -> Part:
        raise NotImplementedError


def check_composition(entries: Sequence[tuple[Any, float]]) -> None:
    """Refuse compositions the kinds cannot express (INVALID_ARGUMENT)."""
    slow = [e for e, _ in entries if e.served is None]
    if slow and len(entries) > 1:
        raise LimitExceeded(
            f"adapter {slow[0].key} (method {slow[0].method.name}) has no serving form and is served alone; "
            "it cannot be composed with other adapters in one request")
    for entry, weight in entries:
        if entry.served is None:
            if weight != 1.0:
                raise LimitExceeded(f"adapter {entry.key} is served on the slow path, which supports weight 1 only")
        else:
            entry.served.kind.check_weight(entry.key, weight)
            entry.served.kind.check_company(entry.key, [e.served for e, _ in entries if e is not entry])


def copy_scaled(regions: list[torch.Tensor], sources: list[torch.Tensor], factors: list[float]) -> None:
    """``regions[i] = factors[i] * sources[i]``, multiplied in the source's precision and rounded
    once into the stack's; host sources into device slots too."""
    scaled = [i for i, f in enumerate(factors) if f != 1.0]
    if scaled:
        sources = list(sources)
        for i, t in zip(scaled, torch._foreach_mul([sources[i] for i in scaled], [factors[i] for i in scaled])):
            sources[i] = t
    if regions and regions[0].device != sources[0].device:
        for region, source in zip(regions, sources):
            region.copy_(source)
        return
    torch._foreach_copy_(regions, sources)


def region(slot_view: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The part of a slot that holds a tensor of ``shape`` (all of it, unless padded)."""
    return slot_view if tuple(slot_view.shape) == tuple(shape) else slot_view[tuple(slice(0, n) for n in shape)]


def write_parts(stack: Any, slot: int, parts: dict[str, tuple[torch.Tensor, ...]],
                factors: dict[str, tuple[float, ...]] | None = None, copy=copy_scaled) -> None:
    """The generic slot write: every stack name gets the form's tensors (scaled) or padding."""
    stack.make_room({n: [t.shape for t in ts] for n, ts in parts.items()}, {n: [t.dtype for t in ts] for n, ts in parts.items()})
    factors = factors or {}
    targets, sources, scales = [], [], []
    for name, tensors in stack.tensors.items():
        part = parts.get(name)
        if part is None:  # a module this adapter does not touch
            for t in tensors:
                t[slot].fill_(stack.kind.pad)
            continue
        for t, source in zip(tensors, part):
            target = t[slot]
            if tuple(source.shape) != tuple(target.shape):  # a smaller rank or width than the stack's: pad the rest
                target.fill_(stack.kind.pad)
                target = region(target, source.shape)
            targets.append(target)
            sources.append(source)
        scales += factors.get(name) or [1.0] * len(part)
    if sources:
        copy(targets, sources, scales)
