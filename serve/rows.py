"""Per-row adapter application: one forward pass serves rows with different adapters.

For every batch composition the engine builds a :class:`BatchPlan` from the rows' serving forms:

* LoRA (``LoraForm``): per targeted module, the batch's adapters are stacked once
  (``A [N+1, R, in]``, ``B [N+1, out, R]``, ranks zero-padded, slot 0 all zeros for "none") and a
  forward hook adds ``sum_k w[b,k] * B[idx[b,k]] @ A[idx[b,k]] @ x_b`` with two gathered einsums
  over (row, slot) - Punica's BGMV / S-LoRA's idea, no loop over adapters.
* Bottleneck (``BottleneckForm``): stacked the same way and applied per row after the module, in
  the request's order (a loop over slot positions, each slot gathered over rows).
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
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from adapterhub.errors import LimitExceeded
from adapterhub.serving_forms import BottleneckForm, LoraForm, PrefixForm, ScaleForm

SUPPORTED_FORMS = (LoraForm, BottleneckForm, PrefixForm, ScaleForm)
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def prepare_form(form: Any, device: torch.device) -> Any:
    """Move a form's tensors to the model's device (float32), once, when the adapter loads."""
    def mv(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=torch.float32).contiguous()

    if isinstance(form, LoraForm):
        return LoraForm({m: (mv(a), mv(b)) for m, (a, b) in form.deltas.items()})
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

    index: torch.Tensor  # [B, K] long
    weight: torch.Tensor  # [B, K] float


def _slots(rows: Sequence[Sequence[tuple[Any, float]]], kind: type, order: dict[int, int], device) -> _Slots | None:
    per_row = [[(order[id(e)], w) for e, w in row if isinstance(e.form, kind)] for row in rows]
    width = max((len(r) for r in per_row), default=0)
    if width == 0:
        return None
    index = torch.zeros(len(rows), width, dtype=torch.long)
    weight = torch.zeros(len(rows), width)
    for b, row in enumerate(per_row):
        for k, (i, w) in enumerate(row):
            index[b, k], weight[b, k] = i, w
    return _Slots(index.to(device), weight.to(device))


class StackCache:
    """Stacked tensors for recent adapter sets, so a stable batch does not restack every step."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: collections.OrderedDict[tuple, dict] = collections.OrderedDict()

    def get(self, kind: str, adapters: list[Any], build) -> dict:
        key = (kind, tuple(a.key for a in adapters))  # "task@N": immutable, unlike id() of evicted entries
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build(adapters)
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


def _stack_lora(adapters: list[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    stacks = {}
    modules = sorted({m for a in adapters for m in a.form.deltas})
    for module in modules:
        present = [a.form.deltas.get(module) for a in adapters]
        some_a, some_b = next(p for p in present if p is not None)
        rank = max(p[0].shape[0] for p in present if p is not None)
        A = some_a.new_zeros(len(adapters) + 1, rank, some_a.shape[1])
        B = some_b.new_zeros(len(adapters) + 1, some_b.shape[0], rank)
        for i, p in enumerate(present, start=1):
            if p is not None:
                A[i, : p[0].shape[0]] = p[0]
                B[i, :, : p[1].shape[1]] = p[1]
        stacks[module] = (A, B)
    return stacks


def _stack_scales(adapters: list[Any]) -> dict[str, Any]:
    stacks: dict[str, Any] = {"in": {}, "out": {}}
    for side, attr in (("in", "input_scales"), ("out", "output_scales")):
        for module in sorted({m for a in adapters for m in getattr(a.form, attr)}):
            present = [getattr(a.form, attr).get(module) for a in adapters]
            some = next(p for p in present if p is not None)
            S = some.new_ones(len(adapters) + 1, some.shape[0])
            for i, p in enumerate(present, start=1):
                if p is not None:
                    S[i] = p
            stacks[side][module] = S
    return stacks


def _stack_bottleneck(adapters: list[Any]) -> dict[str, Any]:
    stacks: dict[str, Any] = {"activation": [""] + [a.form.activation for a in adapters]}
    modules = sorted({m for a in adapters for m in a.form.layers})
    for module in modules:
        present = [a.form.layers.get(module) for a in adapters]
        dw, _, uw, _ = next(p for p in present if p is not None)
        rank = max(p[0].shape[0] for p in present if p is not None)
        hidden = dw.shape[1]
        n = len(adapters) + 1
        D, Db = dw.new_zeros(n, rank, hidden), dw.new_zeros(n, rank)
        U, Ub = uw.new_zeros(n, hidden, rank), uw.new_zeros(n, hidden)
        for i, p in enumerate(present, start=1):
            if p is not None:
                r = p[0].shape[0]
                D[i, :r], Db[i, :r], U[i, :, :r], Ub[i] = p[0], p[1], p[2], p[3]
        stacks[module] = (D, Db, U, Ub)
    return stacks


class BatchPlan:
    """What the hooks apply for one batch composition (rows in batch order)."""

    def __init__(self, rows: Sequence[Sequence[tuple[Any, float]]], stack_cache: StackCache, device):
        self.rows = rows
        self.lora_adapters = _unique(rows, LoraForm)
        self.bottleneck_adapters = _unique(rows, BottleneckForm)
        self.scale_adapters = _unique(rows, ScaleForm)
        order = {id(a): i for i, a in enumerate(self.lora_adapters, start=1)}
        order.update({id(a): i for i, a in enumerate(self.bottleneck_adapters, start=1)})
        order.update({id(a): i for i, a in enumerate(self.scale_adapters, start=1)})
        self.scale_slots = _slots(rows, ScaleForm, order, device)
        self.scales = (stack_cache.get("scale", self.scale_adapters, _stack_scales) if self.scale_slots
                       else {"in": {}, "out": {}})
        self.lora_slots = _slots(rows, LoraForm, order, device)
        self.bottleneck_slots = _slots(rows, BottleneckForm, order, device)
        self.lora = stack_cache.get("lora", self.lora_adapters, _stack_lora) if self.lora_slots else {}
        self.bottleneck = (stack_cache.get("bottleneck", self.bottleneck_adapters, _stack_bottleneck)
                           if self.bottleneck_slots else {})
        self.prefix_lengths = [sum(e.form.keys.shape[2] for e, _ in row if isinstance(e.form, PrefixForm)) for row in rows]

    @property
    def modules(self) -> set[str]:
        return set(self.lora) | (set(self.bottleneck) - {"activation"}) | set(self.scales["out"])

    @property
    def input_modules(self) -> set[str]:
        return set(self.scales["in"])

    def _scale(self, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.scale_slots
        factor = (1 + s.weight[:, :, None] * (S[s.index] - 1)).prod(dim=1)  # [B, dim]
        return t * factor[:, None, :].to(t.dtype)

    def apply_input(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self._scale(self.scales["in"][module], x)

    def apply(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if module in self.scales["out"]:
            out = self._scale(self.scales["out"][module], out)
        if module in self.lora:
            A, B = self.lora[module]
            s = self.lora_slots
            h = torch.einsum("bti,bkri->bktr", x.to(A.dtype), A[s.index]) * s.weight[:, :, None, None]
            out = out + torch.einsum("bktr,bkor->bto", h, B[s.index]).to(out.dtype)
        if module in self.bottleneck:
            D, Db, U, Ub = self.bottleneck[module]
            s = self.bottleneck_slots
            acts = self.bottleneck["activation"]
            for k in range(s.index.shape[1]):
                idx = s.index[:, k]
                z = torch.einsum("bth,brh->btr", out.to(D.dtype), D[idx]) + Db[idx][:, None, :]
                z = _activate(z, [acts[i] for i in idx.tolist()])
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


def _unique(rows, kind) -> list[Any]:
    seen: dict[int, Any] = {}
    for row in rows:
        for entry, _ in row:
            if isinstance(entry.form, kind):
                seen.setdefault(id(entry), entry)
    return list(seen.values())


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
        """Hook ``modules`` (base names) not hooked yet; call only between forward passes."""
        for name in modules - set(self._hooked):
            self._hooked[name] = self._module(name).register_forward_hook(self._make_hook(name))
        for name in set(input_modules) - set(self._pre_hooked):
            self._pre_hooked[name] = self._module(name).register_forward_pre_hook(self._make_pre_hook(name))

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise LimitExceeded(f"adapter targets module {name!r}, which the base model does not have") from None

    def _make_pre_hook(self, name: str):
        def pre_hook(_module, args):
            plan = self.plan
            if plan is None or name not in plan.input_modules:
                return None
            return (plan.apply_input(name, args[0]),) + tuple(args[1:])

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
