"""Per-row adapter application: one forward pass serves rows with different adapters.

Adapters of the stackable kinds live in :class:`ResidentStacks` for the engine's lifetime (one
slot per resident adapter, slot 0 = "none", written once when an adapter is first used, rebuilt
only to grow). Each step the engine builds a cheap :class:`BatchPlan` (per-row slot indices):

* LoRA (``LoraForm``): stacks ``A.T [S, in, R]``, ``B.T [S, R, out]`` (ranks zero-padded); a
  forward hook adds ``w * (x @ A.T) @ B.T`` per row, in place, per slot position of a request
  (never a loop over adapters). On the CPU that is the C kernel of :mod:`.bgmv` (Punica's BGMV
  idea: each token reads its adapter's weights in place, tokens sharing an adapter read it once,
  rows without one are skipped); elsewhere, or without the extension, two fused gather-matmuls
  (weighted ``embedding_bag`` over the row's slot). (``grouped_mm`` was tried: its CPU version
  loops over every slot in C++ and was 3-4x slower.) When every row of the batch uses the same
  single adapter, two plain matmuls: BLAS is fastest when there is nothing to gather.
* Bottleneck (``BottleneckForm``): stacked the same way, gathered per row and applied after the
  module in the request's order (a loop over slot positions, not adapters).
* Scale (``ScaleForm``, IA3): per-row scale vectors gathered from a stack whose slot 0 is all
  ones; a weight ``w`` scales by ``1 + w (s - 1)``; several multiply. Input scales run in a
  forward pre-hook, output scales in the forward hook.
* Prefix (``PrefixForm``): per-row key/value prefixes, concatenated in request order, right-
  aligned in a prefilled cache; rows with shorter or no prefixes get masked zero padding.

Hooks are plain ``register_forward_hook`` on the base modules: they do nothing while no plan is
set (the slow path loads PEFT on the same modules), and the model's structure never changes.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from adapterhub.errors import LimitExceeded
from adapterhub.serving_forms import BottleneckForm, LoraDeltas, LoraForm, PrefixForm, ScaleForm

from . import bgmv
from .lora_backends import LoraBackend, TokenSlots

SUPPORTED_FORMS = (LoraForm, BottleneckForm, PrefixForm, ScaleForm)
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def prepare_form(form: Any, device: torch.device) -> Any:
    """Move a form's tensors to the model's device (float32), once, when the adapter loads.

    LoRA forms are left where they are: their tensors only feed the slot write, whose one copy
    moves, converts and transposes them anyway (touching 84 tensors here would cost more).
    """
    def mv(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=torch.float32).contiguous()

    if isinstance(form, LoraForm):
        if isinstance(form.deltas, LoraDeltas) and form.deltas.in_file:
            return form  # views of the bytes read (looked at here, the 84 views would be made)
        if not any(a.requires_grad or b.requires_grad for a, b in form.deltas.values()):
            return form  # the usual case (tensors read from files): 168 detach() calls spared per load
        return LoraForm({m: (a.detach(), b.detach()) for m, (a, b) in form.deltas.items()}, dict(form.scales))
    if isinstance(form, BottleneckForm):
        if form.activation not in ACTIVATIONS:
            raise LimitExceeded(f"bottleneck activation {form.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        return BottleneckForm(form.activation, {m: tuple(mv(t) for t in ts) for m, ts in form.layers.items()})
    if isinstance(form, PrefixForm):
        return PrefixForm(mv(form.keys), mv(form.values))
    if isinstance(form, ScaleForm):
        return ScaleForm({m: mv(v) for m, v in form.output_scales.items()}, {m: mv(v) for m, v in form.input_scales.items()})
    return form


def validate_composition(entries: Sequence[tuple[Any, float]]) -> None:
    """Refuse compositions the forms cannot express (INVALID_ARGUMENT)."""
    slow = [e for e, _ in entries if e.form is None]
    if slow and len(entries) > 1:
        raise LimitExceeded(
            f"adapter {slow[0].key} (method {slow[0].method.name}) has no serving form and is served alone; "
            "it cannot be composed with other adapters in one request"
        )
    for entry, weight in entries:
        if isinstance(entry.form, PrefixForm) and weight != 1.0:
            raise LimitExceeded(f"adapter {entry.key} is a prefix; prefixes cannot be weighted (use weight 1)")
        if entry.form is None and weight != 1.0:
            raise LimitExceeded(f"adapter {entry.key} is served on the slow path, which supports weight 1 only")


@dataclasses.dataclass
class _Slots:
    """Per-row slot indices into a stack (0 = no adapter) and weights."""

    index: torch.Tensor  # [B, K] long, on the batch's device
    weight: torch.Tensor  # [B, K] float
    host_index: list[list[int]]  # the same on the host: what the step's plan is built from, without a sync
    host_weight: list[list[float]]


class SlotStack:
    """Stacked tensors of the resident adapters of one form kind; slot 0 means "no adapter".

    An adapter gets a slot the first time a batch uses it and keeps it while it stays in use or
    recently used: later batches, whatever their mix, only gather from the stack. A new adapter is
    written into a free slot (or the least recently used slot no running row needs): a copy of
    that adapter's tensors only. The whole stack is rebuilt only to grow (more slots, a larger
    rank, a module not seen before); ``rebuilds`` and ``writes`` count both for tests.

    Once written, the adapter's form points at views of its slot, so a resident adapter costs its
    tensor bytes once, not twice; a form whose slot is reused gets its own copy back first.
    """

    def __init__(self, parts_of, set_parts, pad: float, slots: int = 8, busy=lambda key: False,
                 dtype: torch.dtype | None = None, copy=None, factors_of=lambda form: {}, device: Any = "cpu"):
        self.parts_of = parts_of  # form -> {name: (tensor, ...)}
        self.set_parts = set_parts  # (form, {name: (tensor, ...)}) -> None: rebinds the form's tensors
        self.busy = busy  # key -> True while requests hold that adapter: its slot is never reused then
        self.dtype = dtype  # of the stacks (None: the forms' own); the slot write converts
        self.device = torch.device(device)  # the base's: the slot write copies the forms' tensors there
        self.copy = copy or _copy_scaled  # (regions, sources, factors) -> None: the slot write's one copy call
        self.factors_of = factors_of  # form -> {name: (factor per tensor)}: written times that (missing: 1)
        self._dense: tuple[int, dict[str, tuple[torch.Tensor, ...]]] | None = None  # see dense()
        self._bound: dict[int, list[Any]] = collections.defaultdict(list)  # slot -> forms viewing it
        self._shapes: dict[int, dict[str, list[torch.Size]]] = {}
        self.pad = pad  # value of empty slots and of padding (0; 1 for scales)
        self.capacity = max(1, slots)
        # replaced, never changed in place, when a stack is added or grown: a plan built earlier
        # keeps a consistent set for the step it serves
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.meta: dict[int, Any] = {}  # slot -> the form (e.g. for its activation)
        self._slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.RLock()  # the scheduler and loading threads both assign slots
        self.rebuilds = 0
        self.writes = 0

    def admit(self, key: str, form: Any) -> bool:
        """Write a just-loaded adapter into a slot now, in the loading thread (off the scheduler);
        True when this wrote a slot (False: ``key`` already had one, now shared with ``form``).

        Running rows keep reading their own slots meanwhile: the slot written is free or held by
        an adapter no request uses, and growing replaces the stacks rather than changing them.
        """
        with self._lock:
            known = key in self._slot_of
            self.slots([_Admitted(key, form)])
            return not known

    def forget(self, key: str) -> None:
        """Free ``key``'s slot (its files failed their hash check after the write)."""
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                self._bound.pop(slot, None)

    def slots(self, adapters: Sequence[Any]) -> dict[str, int]:
        """Slot of each adapter (by key ``task@N``: versions are immutable), writing new ones in."""
        needed = {a.key for a in adapters}
        with self._lock:
            for adapter in adapters:
                slot = self._slot_of.get(adapter.key)
                if slot is None:
                    slot = self._free_slot(needed)
                    self._bind(slot, adapter.form, self._write(slot, adapter.form))
                    self._slot_of[adapter.key] = slot
                elif not any(f is adapter.form for f in self._bound[slot]):  # e.g. the same version reloaded
                    self._bind(slot, adapter.form)
                self._slot_of.move_to_end(adapter.key)
            return {key: self._slot_of[key] for key in needed}

    def _free_slot(self, needed: set[str]) -> int:
        used = set(self._slot_of.values())
        free = next((s for s in range(1, self.capacity + 1) if s not in used), None)
        if free is not None:
            return free
        victim = next((k for k in self._slot_of if k not in needed and not self.busy(k)), None)
        if victim is not None:
            slot = self._slot_of.pop(victim)
            views = self._views(slot)
            own = {name: tuple(t.clone() for t in ts) for name, ts in views.items()}
            for form in self._bound.pop(slot, []):
                self.set_parts(form, own)
            return slot
        self.capacity *= 2
        self._grow({name: [list(t.shape[1:]) for t in ts] for name, ts in self.tensors.items()})
        return self._free_slot(needed)

    def _grow(self, shapes: dict[str, list[list[int]]]) -> None:
        """Reallocate the named stacks at ``capacity + 1`` slots and at least ``shapes``, keeping contents."""
        self.rebuilds += 1
        tensors = dict(self.tensors)
        for name, wanted in shapes.items():
            grown = []
            for t, shape in zip(self.tensors[name], wanted):
                new = t.new_full((self.capacity + 1, *[max(a, b) for a, b in zip(t.shape[1:], shape)]), self.pad)
                new[tuple(slice(0, n) for n in t.shape)] = t
                grown.append(new)
            tensors[name] = grown
        self.tensors = tensors
        self._dense = None
        for slot, forms in self._bound.items():  # views of the old tensors would keep them alive
            for form in forms:
                self.set_parts(form, self._views(slot))

    def dense(self, slot: int) -> dict[str, tuple[torch.Tensor, ...]]:
        """``slot``'s tensors of every stack as float32 (kept for the last slot asked): the
        one-adapter batch path multiplies by them with plain BLAS, which has no fast half precision
        on CPUs; converting per step would cost as much as the matmuls."""
        with self._lock:
            if self._dense is None or self._dense[0] != slot:
                self._dense = (slot, {name: tuple(t[slot].float() for t in ts) for name, ts in self.tensors.items()})
            return self._dense[1]

    def _views(self, slot: int) -> "_SlotViews":
        return _SlotViews(self.tensors, slot, self._shapes[slot])

    def _bind(self, slot: int, form: Any, views: dict[str, tuple[torch.Tensor, ...]] | None = None) -> None:
        self.set_parts(form, views if views is not None else self._views(slot))
        self._bound[slot].append(form)

    def _write(self, slot: int, form: Any) -> dict[str, tuple[torch.Tensor, ...]]:
        """Copy the form into ``slot`` (padding the rest); returns the views it wrote, for binding.

        On a hot-swap's path: per tensor no more than one index and one shape check, one copy call
        for all of them.
        """
        self.writes += 1
        parts = self.parts_of(form)
        self._make_room(parts)
        scaled = self.factors_of(form)
        regions, targets, sources, factors = {}, [], [], []
        for name, stack in self.tensors.items():
            part = parts.get(name)
            if part is None:  # a module this adapter does not touch
                for t in stack:
                    t[slot].fill_(self.pad)
                continue
            wrote = []
            for t, source in zip(stack, part):
                region = t[slot]
                if source.shape != region.shape:  # a smaller rank or width than the stack's: pad the rest
                    region.fill_(self.pad)
                    region = _region(region, source.shape)
                wrote.append(region)
            regions[name] = tuple(wrote)
            targets += wrote
            sources += part
            factors += scaled.get(name) or [1.0] * len(part)
        if sources:
            self.copy(targets, sources, factors)
        self._wrote(slot, form, {name: [t.shape for t in ts] for name, ts in parts.items()})
        return regions

    def _wrote(self, slot: int, form: Any, shapes: dict[str, list[tuple[int, ...]]]) -> None:
        self.meta[slot] = form
        if self._dense is not None and self._dense[0] == slot:
            self._dense = None
        self._shapes[slot] = shapes
        self._bound.pop(slot, None)

    def _make_room(self, parts: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """New all-pad stacks for modules no resident adapter touched yet; grow those too small."""
        grow = {}
        for name, ts in parts.items():
            old = self.tensors.get(name)
            if old is None:
                self.tensors = {**self.tensors, name: [torch.full((self.capacity + 1, *t.shape), self.pad,
                                                                  dtype=self.dtype or t.dtype, device=self.device)
                                                       for t in ts]}
            elif [t.shape for t in ts] != [o.shape[1:] for o in old] and \
                    any(any(a > b for a, b in zip(t.shape, o.shape[1:])) for t, o in zip(ts, old)):
                grow[name] = [list(t.shape) for t in ts]
        if grow:
            self._grow(grow)

    def gather_slots(self, rows, kind: type, device) -> _Slots | None:
        """Per-row slots ``[B, K]`` of this kind (K = most adapters of the kind in one row)."""
        per_row = [[(e, w) for e, w in row if isinstance(e.form, kind)] for row in rows]
        width = max((len(r) for r in per_row), default=0)
        if width == 0:
            return None
        slot_of = self.slots(list({e.key: e for r in per_row for e, _ in r}.values()))
        pad = [(0, 0.0)] * width  # lists first, one tensor each: per-element writes cost ~2 ms at 128 rows
        cells = [[(slot_of[e.key], w) for e, w in row] + pad[len(row):] for row in per_row]
        host_index = [[c[0] for c in row] for row in cells]
        host_weight = [[c[1] for c in row] for row in cells]
        index = torch.tensor(host_index, dtype=torch.long)
        weight = torch.tensor(host_weight, dtype=torch.float32)
        return _Slots(index.to(device), weight.to(device), host_index, host_weight)


class LoraStack(SlotStack):
    """The LoRA stacks ``A.T [S, in, r]`` and ``B.T [S, r, out]``.

    A form read from a file (:class:`LoraDeltas` over its bytes) whose modules and shapes the stacks
    already have is written without making one tensor of it: where each A and B lies in the bytes,
    where the slot lies in the stacks, one C call for all (0.5 ms for the bench's 84-tensor adapter,
    2 ms through views). Anything else takes :meth:`SlotStack._write`.
    """

    def __init__(self, slots: int = 8, busy=lambda key: False, dtype: torch.dtype | None = None, device: Any = "cpu"):
        super().__init__(_lora_parts, _set_lora_parts, 0.0, slots, busy, dtype, copy=_copy_lora, factors_of=_lora_factors,
                         device=device)
        self._layout: tuple[Any, dict[str, list[tuple]], Any] = (None, {}, None)  # (the tensors it describes, see _slot_layout)

    def _write(self, slot: int, form: Any) -> Mapping[str, tuple[torch.Tensor, ...]]:
        plan = self._raw_jobs(slot, form)
        if plan is None:
            return super()._write(slot, form)
        jobs, dtype, shapes = plan
        self.writes += 1
        bgmv.transpose_raw(jobs, dtype)
        self._wrote(slot, form, shapes)
        return self._views(slot)

    def _raw_jobs(self, slot: int, form: Any) -> tuple[list[tuple], torch.dtype, dict[str, list[tuple[int, ...]]]] | None:
        """The C copy's jobs ``(source, target, rows, cols, target row stride, factor)``, or None."""
        deltas = form.deltas
        if not (isinstance(deltas, LoraDeltas) and deltas.in_file) or len(deltas) != len(self.tensors):
            return None
        layout, dtype = self._slot_layout()
        if dtype is None:
            return None
        jobs, shapes, scales, f32 = [], {}, form.scales, torch.float32
        for module in deltas:
            where = layout.get(module)
            if where is None:
                return None
            (a, b), ((at, a_step, a_shape, a_ld), (bt, b_step, b_shape, b_ld)) = deltas.raw(module), where
            if a.dtype != f32 or b.dtype != f32 or a.shape[::-1] != a_shape or b.shape[::-1] != b_shape:
                return None
            jobs.append((a.address, at + slot * a_step, a.shape[0], a.shape[1], a_ld, 1.0))
            jobs.append((b.address, bt + slot * b_step, b.shape[0], b.shape[1], b_ld, scales.get(module, 1.0)))
            shapes[module] = [a_shape, b_shape]
        return jobs, dtype, shapes

    def _slot_layout(self) -> tuple[dict[str, list[tuple]], torch.dtype | None]:
        """name -> per stack tensor (address, bytes per slot, slot shape, row stride); and their
        dtype, None where the C copy cannot write them (remade when the stacks are replaced)."""
        tensors = self.tensors
        if self._layout[0] is not tensors:
            stacks = [t for ts in tensors.values() for t in ts]
            dtypes = {t.dtype for t in stacks}
            ok = (bgmv.available() and len(dtypes) == 1 and all(t.is_cpu and t.is_contiguous() for t in stacks)
                  and bgmv.supports(next(iter(dtypes)), 0))
            self._layout = (tensors, {
                name: [(t.data_ptr(), t.stride(0) * t.element_size(), tuple(t.shape[1:]), t.stride(1)) for t in ts]
                for name, ts in tensors.items()}, next(iter(dtypes)) if ok else None)
        return self._layout[1], self._layout[2]


@dataclasses.dataclass
class _Admitted:
    key: str
    form: Any


class _SlotViews(Mapping):
    """name -> the regions of ``slot`` in that name's stack tensors (views), made when asked for.

    ``tensors`` is the stacks' dict of the moment: it is replaced, never changed, when stacks grow,
    and whatever viewed the old one is bound again then.
    """

    def __init__(self, tensors: dict[str, list[torch.Tensor]], slot: int, shapes: dict[str, list[tuple[int, ...]]]):
        self._tensors, self._slot, self._shapes = tensors, slot, shapes

    def __getitem__(self, name: str) -> tuple[torch.Tensor, ...]:
        return tuple(_region(t[self._slot], shape) for t, shape in zip(self._tensors[name], self._shapes[name]))

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def _region(slot_view: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The part of a slot that holds a tensor of ``shape`` (all of it, unless padded)."""
    return slot_view if slot_view.shape == shape else slot_view[tuple(slice(0, n) for n in shape)]


def _copy_scaled(regions: list[torch.Tensor], sources: list[torch.Tensor], factors: list[float]) -> None:
    """``regions[i] = factors[i] * sources[i]``, multiplied in the source's precision and rounded
    once into the stack's (as the C path does)."""
    scaled = [i for i, f in enumerate(factors) if f != 1.0]
    if scaled:
        sources = list(sources)
        for i, t in zip(scaled, torch._foreach_mul([sources[i] for i in scaled], [factors[i] for i in scaled])):
            sources[i] = t
    if regions and regions[0].device != sources[0].device:  # host forms into device slots
        for region, source in zip(regions, sources):
            region.copy_(source, non_blocking=False)
        return
    torch._foreach_copy_(regions, sources)


def _copy_lora(regions: list[torch.Tensor], sources: list[torch.Tensor], factors: list[float]) -> None:
    """The LoRA slot write: the C extension's transposing copy where it applies, PyTorch for the rest."""
    rest = bgmv.copy_transposed(regions, sources, factors)
    if rest[0]:
        _copy_scaled(*rest)


def _lora_parts(form: LoraForm) -> dict[str, tuple[torch.Tensor, ...]]:
    # stored transposed, (A.T [in, r], B.T [r, out]): the layout of x @ W in a grouped matmul
    return {m: (a.T, b.T) for m, (a, b) in form.deltas.items()}


def _lora_factors(form: LoraForm) -> dict[str, tuple[float, ...]]:
    return {m: (1.0, s) for m, s in form.scales.items()}


def _set_lora_parts(form: LoraForm, parts: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    form.deltas = _Transposed(parts)
    form.scales = {}  # the slot holds B already scaled


class _Transposed(Mapping):
    """LoRA deltas (A, B) over stack parts (A.T, B.T), each pair made when asked for: a load binds
    its form to its slot without making the 168 views nobody may look at."""

    def __init__(self, parts: Mapping[str, tuple[torch.Tensor, ...]]):
        self._parts = parts

    def __getitem__(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        at, bt = self._parts[module]
        return at.T, bt.T

    def __iter__(self):
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def _set_bottleneck_parts(form: BottleneckForm, parts: dict[str, tuple[torch.Tensor, ...]]) -> None:
    form.layers = dict(parts)


def _set_scale_parts(form: ScaleForm, parts: dict[str, tuple[torch.Tensor, ...]]) -> None:
    form.output_scales = {n[4:]: t[0] for n, t in parts.items() if n.startswith("out:")}
    form.input_scales = {n[3:]: t[0] for n, t in parts.items() if n.startswith("in:")}


def _bottleneck_parts(form: BottleneckForm) -> dict[str, tuple[torch.Tensor, ...]]:
    return dict(form.layers)


def _scale_parts(form: ScaleForm) -> dict[str, tuple[torch.Tensor, ...]]:
    parts = {f"out:{m}": (v,) for m, v in form.output_scales.items()}
    parts.update({f"in:{m}": (v,) for m, v in form.input_scales.items()})
    return parts


class ResidentStacks:
    """One :class:`SlotStack` per stackable form kind, kept for the engine's lifetime."""

    def __init__(self, slots: int = 8, busy=lambda key: False, lora_dtype: torch.dtype | None = None,
                 device: Any = "cpu"):
        self.lora = LoraStack(slots, busy, lora_dtype, device)
        self.bottleneck = SlotStack(_bottleneck_parts, _set_bottleneck_parts, 0.0, slots, busy, device=device)
        self.scale = SlotStack(_scale_parts, _set_scale_parts, 1.0, slots, busy, device=device)
        self._by_form = {LoraForm: self.lora, BottleneckForm: self.bottleneck, ScaleForm: self.scale}

    def admit(self, key: str, form: Any) -> bool:
        """Give a just-loaded stackable form its slot now (see :meth:`SlotStack.admit`)."""
        stack = self._by_form.get(type(form))
        return stack is not None and stack.admit(key, form)

    def forget(self, key: str) -> None:
        for stack in self._by_form.values():
            stack.forget(key)

    @property
    def rebuilds(self) -> int:
        return self.lora.rebuilds + self.bottleneck.rebuilds + self.scale.rebuilds

    @property
    def writes(self) -> int:
        return self.lora.writes + self.bottleneck.writes + self.scale.writes


def _shared_slot(slots: _Slots | None) -> int | None:
    """The one slot every row uses (one adapter, weight 1), or None: rows differ or compose (from the
    host lists: no device synchronisation)."""
    if slots is None or len(slots.host_index[0]) != 1:
        return None
    first = slots.host_index[0][0]
    same = all(row == [first] for row in slots.host_index) and all(w == [1.0] for w in slots.host_weight)
    return first if same else None


class BatchPlan:
    """What the hooks apply for one batch (rows in batch order); built per step, stacks are not."""

    def __init__(self, rows: Sequence[Sequence[tuple[Any, float]]], stacks: ResidentStacks, device, *,
                 backend: LoraBackend):
        self.rows = rows
        self.device = device
        self.backend = backend
        self.scale_slots = stacks.scale.gather_slots(rows, ScaleForm, device)
        self.lora_slots = stacks.lora.gather_slots(rows, LoraForm, device)
        self.bottleneck_slots = stacks.bottleneck.gather_slots(rows, BottleneckForm, device)
        self.lora = stacks.lora.tensors if self.lora_slots is not None else {}
        self.bottleneck = stacks.bottleneck.tensors if self.bottleneck_slots is not None else {}
        self.activations = {s: f.activation for s, f in dict(stacks.bottleneck.meta).items()}  # a copy: loads add slots
        scales = stacks.scale.tensors if self.scale_slots is not None else {}
        self.scales = {"out": {n[4:]: t[0] for n, t in scales.items() if n.startswith("out:")},
                       "in": {n[3:]: t[0] for n, t in scales.items() if n.startswith("in:")}}
        self.modules = set(self.lora) | set(self.bottleneck) | set(self.scales["out"])
        self.input_modules = set(self.scales["in"])
        self.prefix_lengths = [sum(e.form.keys.shape[2] for e, _ in row if isinstance(e.form, PrefixForm)) for row in rows]
        self._tokens_of: dict[tuple[int, int], TokenSlots] = {}  # per slot position and tokens per row, for this step
        self.shared_lora_slot = _shared_slot(self.lora_slots)
        self.shared_lora = stacks.lora.dense(self.shared_lora_slot) if self.shared_lora_slot is not None else {}
        # a backend that can run a mixed batch's LoRA meanwhile (the C kernel on a spare core) is
        # handed it in a forward pre-hook, before the base layer runs, and it is added after
        self.queued_modules = {m for m, (At, _) in self.lora.items() if backend.supports(At.dtype, At.shape[2])} \
            if getattr(backend, "overlap", False) and self.shared_lora_slot is None else set()
        self._queued: dict[str, Any] = {}

    def _scale(self, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.scale_slots
        factor = (1 + s.weight[:, :, None] * (S[s.index] - 1)).prod(dim=1)  # [B, dim]
        return t * factor[:, None, :].to(t.dtype)

    def apply_input(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self._scale(self.scales["in"][module], x)

    def _tokens(self, k: int, tokens: int, num_slots: int) -> TokenSlots:
        """Slot and weight of every token for slot position ``k`` (built once per step, shared by modules)."""
        key = (k, tokens)
        if key not in self._tokens_of:
            s = self.lora_slots
            self._tokens_of[key] = TokenSlots.from_rows([row[k] for row in s.host_index], [row[k] for row in s.host_weight],
                                                        tokens, num_slots, self.device)
        return self._tokens_of[key]

    def _lora_delta(self, module: str, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_k w[b,k] * (x_b @ A[slot].T) @ B[slot].T`` as ``[B * T, out]``, added to ``into`` (2-D,
        changed in place) when given: the backend per slot position, or two plain matmuls when every
        row has the same one adapter."""
        At, Bt = self.lora[module]
        width, out = At.shape[1], Bt.shape[2]
        if self.shared_lora_slot is not None:  # BLAS beats gathering when there is nothing to gather
            a, b = self.shared_lora[module]
            h = torch.mm(x.reshape(-1, width).to(a.dtype), a)
            if into is None:
                return torch.mm(h, b)
            # the dense copy is float32; a half-precision base adds its delta in its own dtype
            return into.addmm_(h, b) if into.dtype == h.dtype else into.add_(torch.mm(h, b).to(into.dtype))
        flat = x.reshape(-1, width)
        tokens = flat.shape[0] // len(self.rows)
        target = into if into is not None else flat.new_zeros(flat.shape[0], out, dtype=torch.float32)
        for k in range(self.lora_slots.index.shape[1]):  # slot positions (adapters composed in one request), not adapters
            self.backend.add(flat, At, Bt, self._tokens(k, tokens, At.shape[0]), target)
        return target

    def queue_lora(self, module: str, x: torch.Tensor) -> None:
        """Hand ``module``'s LoRA for input ``x`` to the backend to run meanwhile (see ``queued_modules``);
        a backend that declines now leaves it to the forward hook, in line."""
        At, Bt = self.lora[module]
        tokens = x.numel() // At.shape[1] // len(self.rows)
        pending = self.backend.start(x, [(At, Bt, self._tokens(k, tokens, At.shape[0]))
                                         for k in range(self.lora_slots.index.shape[1])])
        if pending is not None:
            self._queued[module] = pending

    def drain(self) -> None:
        """Wait for every queued job (a forward pass that raised may leave some): their tensors are
        released only then."""
        for pending in self._queued.values():
            pending.wait()
        self._queued.clear()
        if self.queued_modules:
            self.backend.pass_ends()

    def apply(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if module in self.scales["out"]:
            out = self._scale(self.scales["out"][module], out)
        if module in self._queued:
            out = self._queued.pop(module).finish(out)
        elif module in self.lora:
            if out.dtype == torch.promote_types(out.dtype, self.lora[module][0].dtype) and out.is_contiguous():  # this forward's own tensor
                self._lora_delta(module, x, into=out.view(-1, out.shape[-1]))
            else:
                out = out + self._lora_delta(module, x).to(out.dtype).view(out.shape)
        if module in self.bottleneck:
            D, Db, U, Ub = self.bottleneck[module]
            s = self.bottleneck_slots
            for k in range(s.index.shape[1]):  # in the request's order
                idx = s.index[:, k]
                z = torch.einsum("bth,brh->btr", out.to(D.dtype), D[idx]) + Db[idx][:, None, :]
                z = _activate(z, [self.activations.get(row[k], "") for row in s.host_index])
                up = torch.einsum("btr,bhr->bth", z, U[idx]) + Ub[idx][:, None, :]
                out = out + (up * s.weight[:, k, None, None]).to(out.dtype)
        return out

    def prefix_cache(self, num_layers: int, device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor | None]:
        """Per-layer (keys, values) ``[B, kv_heads, P, head_dim]`` and the prefix mask ``[B, P]``."""
        width = max(self.prefix_lengths, default=0)
        if width == 0:
            return None, None
        sample = next(e.form for row in self.rows for e, _ in row if isinstance(e.form, PrefixForm))
        _, heads, _, dim = sample.keys.shape
        keys = sample.keys.new_zeros(num_layers, len(self.rows), heads, width, dim)
        values = torch.zeros_like(keys)
        mask = torch.zeros(len(self.rows), width, dtype=torch.long, device=device)
        for b, row in enumerate(self.rows):
            parts = [e.form for e, _ in row if isinstance(e.form, PrefixForm)]
            if not parts:
                continue
            k = torch.cat([p.keys for p in parts], dim=2)
            v = torch.cat([p.values for p in parts], dim=2)
            n = k.shape[2]
            keys[:, b, :, width - n:] = k
            values[:, b, :, width - n:] = v
            mask[b, width - n:] = 1
        return [(keys[layer], values[layer]) for layer in range(num_layers)], mask


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


class RowHooks:
    """Forward hooks on base modules that apply the current plan; inert while ``plan`` is None."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.plan: BatchPlan | None = None
        self._hooked: dict[str, Any] = {}
        self._pre_hooked: dict[str, Any] = {}

    def ensure(self, modules: set[str], input_modules: set[str] = frozenset()) -> None:
        """Hook exactly ``modules`` (forward hooks) and ``input_modules`` (forward pre-hooks: input
        scales, queued LoRA), by base names; call only between forward passes.

        Hooks the plan does not need are removed, not left inert: a module with any forward hook
        takes PyTorch's slow call path, about 2% of a batch-32 decode step over 42 modules.
        """
        self._sync(self._hooked, set(modules), lambda m, name: m.register_forward_hook(self._make_hook(name)))
        self._sync(self._pre_hooked, set(input_modules),
                   lambda m, name: m.register_forward_pre_hook(self._make_pre_hook(name)))

    def _sync(self, hooked: dict[str, Any], wanted: set[str], register) -> None:
        for name in set(hooked) - wanted:
            hooked.pop(name).remove()
        for name in wanted - set(hooked):
            hooked[name] = register(self._module(name), name)

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise LimitExceeded(f"adapter targets module {name!r}, which the base model does not have") from None

    def _make_pre_hook(self, name: str):
        def pre_hook(_module, args):
            plan = self.plan
            if plan is None:
                return None
            if name in plan.input_modules:
                args = (plan.apply_input(name, args[0]),) + tuple(args[1:])
            if name in plan.queued_modules:
                plan.queue_lora(name, args[0])  # the input the module (and its forward hook) sees
            return args

        return pre_hook

    def _make_hook(self, name: str):
        def hook(_module, args, output):
            plan = self.plan
            if plan is None or name not in plan.modules:
                return output
            if isinstance(output, tuple):
                return (plan.apply(name, args[0], output[0]),) + output[1:]
            return plan.apply(name, args[0], output)

        return hook

    def remove(self) -> None:
        for handle in list(self._hooked.values()) + list(self._pre_hooked.values()):
            handle.remove()
        self._hooked.clear()
        self._pre_hooked.clear()
