"""Device stacks of the resident adapters, one per stacked kind: the engine's slot pool.

An adapter's tensors are copied into a slot of its kind's stack when it loads (in the loading
thread, while its hash check runs); slot 0 means "no adapter". The slot then is the adapter's
only copy: the plugin's form is never rebound or changed, and the cache keeps no tensors of it.
A slot stays the adapter's while the cache holds it (resident, or in use by a running request)
and is reused only after the cache has let it go (:meth:`SlotPool.retire`); an adapter loaded
again before that finds its slot as it left it. Stacks are rebuilt only to grow (more slots, a
larger rank, a module not seen before); ``rebuilds`` and ``writes`` count both for tests.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from adapterhub.errors import PluginError

from .kinds import KINDS, Served, Slots, kind_of

__all__ = ["Served", "SlotPool", "SlotStack", "Slots"]  # Served and Slots: the kinds' types, named here too


Parts = dict[str, tuple[torch.Tensor, ...]]  # stack name (a module, or "out:module") -> its tensors


class SlotStack:
    """One kind's stacks: per name, one tensor ``[capacity + 1, *shape]`` per part of the form."""

    def __init__(self, kind: Any, device: torch.device, dtype: torch.dtype | None, slots: int, pool: Any = None):
        self.kind = kind  # write(stack, slot, form), pad
        self.pool = pool  # the pool it belongs to (a kind may read the pool's base model when it writes)
        self.device, self.dtype = device, dtype  # dtype None: the forms' own
        self.capacity = max(1, slots)
        # replaced, never changed in place, when a stack is added or grown: a plan built earlier
        # keeps a consistent set for the step it serves
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.meta: dict[int, Any] = {}  # slot -> what the kind keeps per adapter (e.g. an activation)
        self.derived: dict[str, Any] = {}  # what the kind derives from the tensors (it checks they are current)
        self.slot_of: dict[str, int] = {}
        self.retired: dict[str, None] = {}  # keys the cache let go, oldest first: their slots may be reused
        self._dense: tuple[int, Parts] | None = None
        self._lock = threading.RLock()  # loading threads write, the scheduler reads slot numbers
        self.rebuilds = 0
        self.writes = 0

    def admit(self, key: str, form: Any) -> bool:
        """Give ``key`` a slot holding ``form``'s tensors; False when it still had one (not rewritten)."""
        with self._lock:
            if key in self.slot_of:
                self.retired.pop(key, None)
                return False
            slot = self._free_slot()
            self.kind.write(self, slot, form)
            self.writes += 1
            self.slot_of[key] = slot
            if self._dense is not None and self._dense[0] == slot:
                self._dense = None
            return True

    def retire(self, key: str) -> None:
        with self._lock:
            if key in self.slot_of:
                self.retired[key] = None

    def forget(self, key: str) -> None:
        """Free ``key``'s slot now (its files failed their hash check after the write)."""
        with self._lock:
            self.retired.pop(key, None)
            self.meta.pop(self.slot_of.pop(key, -1), None)

    def _free_slot(self) -> int:
        used = set(self.slot_of.values())
        free = next((s for s in range(1, self.capacity + 1) if s not in used), None)
        if free is not None:
            return free
        if self.retired:
            victim = next(iter(self.retired))
            self.retired.pop(victim)
            slot = self.slot_of.pop(victim)
            self.meta.pop(slot, None)
            return slot
        self.capacity *= 2
        self.grow({name: [list(t.shape[1:]) for t in ts] for name, ts in self.tensors.items()})
        return self._free_slot()

    def grow(self, shapes: dict[str, list[list[int]]]) -> None:
        """Reallocate the named stacks at ``capacity + 1`` slots and at least ``shapes``, keeping contents."""
        self.rebuilds += 1
        tensors = dict(self.tensors)
        for name, wanted in shapes.items():
            grown = []
            for t, shape in zip(self.tensors[name], wanted):
                new = t.new_full((self.capacity + 1, *[max(a, b) for a, b in zip(t.shape[1:], shape)]), self.kind.pad)
                new[tuple(slice(0, n) for n in t.shape)] = t
                grown.append(new)
            tensors[name] = grown
        self.tensors = tensors
        self._dense = None

    def make_room(self, parts: dict[str, Sequence[Sequence[int]]], dtypes: dict[str, Sequence[torch.dtype]]) -> None:
        """New all-pad stacks for names no resident adapter had yet; grow those too small for ``parts``' shapes."""
        grow = {}
        for name, shapes in parts.items():
            old = self.tensors.get(name)
            if old is None:
                self.tensors = {**self.tensors, name: [
                    torch.full((self.capacity + 1, *shape), self.kind.pad, dtype=self.dtype or dtype, device=self.device)
                    for shape, dtype in zip(shapes, dtypes[name])]}
            elif any(any(a > b for a, b in zip(shape, o.shape[1:])) for shape, o in zip(shapes, old)):
                grow[name] = [list(shape) for shape in shapes]
        if grow:
            self.grow(grow)

    def dense(self, slot: int) -> Parts:
        """``slot``'s tensors as float32 (kept for the last slot asked): the one-adapter batch path
        multiplies by them with plain BLAS, which has no fast half precision on CPUs."""
        with self._lock:
            if self._dense is None or self._dense[0] != slot:
                self._dense = (slot, {name: tuple(t[slot].float() for t in ts) for name, ts in self.tensors.items()})
            return self._dense[1]

    def gather(self, rows: Sequence[Sequence[tuple[str, float]]], device: torch.device) -> Slots | None:
        """Per-row slots of ``rows`` (each a list of (key, weight) of this kind), None when no row has one."""
        width = max((len(r) for r in rows), default=0)
        if width == 0:
            return None
        with self._lock:
            slot_of = dict(self.slot_of)
        pad = [(0, 0.0)] * width  # lists first, one tensor each: per-element writes cost ~2 ms at 128 rows
        cells = [[(slot_of[key], w) for key, w in row] + pad[len(row):] for row in rows]
        host_index = [[c[0] for c in row] for row in cells]
        host_weight = [[c[1] for c in row] for row in cells]
        index = torch.tensor(host_index, dtype=torch.long)
        weight = torch.tensor(host_weight, dtype=torch.float32)
        return Slots(index.to(device), weight.to(device), host_index, host_weight)


class SlotPool:
    """The stacks of every stacked kind on one device, with one dtype for LoRA (``--lora-dtype``)."""

    def __init__(self, device: torch.device | str = "cpu", *, lora_dtype: torch.dtype | None = None, slots: int = 8,
                 model: Any = None):
        self.device = torch.device(device)
        self.lora_dtype = lora_dtype
        self.model = model  # the base, for kinds that read its weights once when an adapter loads (DoRA)
        self.slots = slots
        self._stacks: dict[str, SlotStack] = {}
        self._lock = threading.Lock()

    def stack(self, kind: Any) -> SlotStack:
        with self._lock:
            if kind.name not in self._stacks:
                self._stacks[kind.name] = SlotStack(kind, self.device, kind.stack_dtype(self), self.slots, self)
            return self._stacks[kind.name]

    def admit(self, key: str, form: Any) -> Served:
        """The form's kind prepares it: stacked kinds copy it into a slot here; PluginError when the
        form is of no kind the engine knows (the method declared ``mixed_batch`` but returned it)."""
        kind = kind_of(form)
        if kind is None:
            raise PluginError(f"serving form {type(form).__name__} is of no kind this server applies "
                              f"({', '.join(k.form_type.__name__ for k in KINDS)}); the method must declare "
                              "mixed_batch=False, or return one of those")
        return kind.admit(self, key, form)

    def retire(self, key: str) -> None:
        """The cache let ``key`` go (evicted or unloaded, and no request holds it): its slots may be reused."""
        for stack in list(self._stacks.values()):
            stack.retire(key)

    def forget(self, key: str) -> None:
        for stack in list(self._stacks.values()):
            stack.forget(key)

    @property
    def rebuilds(self) -> int:
        return sum(s.rebuilds for s in self._stacks.values())

    @property
    def writes(self) -> int:
        return sum(s.writes for s in self._stacks.values())

    def __getattr__(self, name: str) -> SlotStack:
        """``pool.lora``, ``pool.scale``, ...: a kind's stack by the kind's name (tests, benchmarks)."""
        for kind in KINDS:
            if kind.name == name and kind.stacked:
                return self.stack(kind)
        raise AttributeError(name)

