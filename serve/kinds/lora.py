"""LoRA (``LoraForm``): per-row low-rank deltas ``w * (x @ A.T) @ B.T`` added to a module's output.

Stacks ``A.T [S, in, r]`` and ``B.T [S, r, out]`` (ranks zero-padded, B already scaled) in the
pool's LoRA dtype. A step's deltas go to the engine's LoRA backend (:mod:`..lora_backends`) per
slot position of a composition (never a loop over adapters); when every row of the batch uses the
same single adapter, two plain matmuls instead (BLAS is fastest when there is nothing to gather).
A backend that can run the deltas meanwhile (the C kernel on a spare core) gets them in the
forward pre-hook, before the base layer runs, and they are added after it.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterhub.serving_forms import LoraDeltas, LoraForm

from ..lora_backends import LoraBackend, TokenSlots, cpu_c
from .base import Part, Slots, StackedKind, copy_scaled, write_parts


class LoraKind(StackedKind):
    name = "lora"
    form_type = LoraForm

    def stack_dtype(self, pool: Any) -> torch.dtype | None:
        return pool.lora_dtype

    def write(self, stack: Any, slot: int, form: LoraForm) -> None:
        if not _write_from_file(stack, slot, form):
            # stored transposed, (A.T [in, r], B.T [r, out]): the layout of x @ W in a grouped matmul
            parts = {m: (a.detach().T, b.detach().T) for m, (a, b) in form.deltas.items()}
            write_parts(stack, slot, parts, {m: (1.0, s) for m, s in form.scales.items()}, copy=_copy_lora)

    def part(self, slots: Slots, stack: Any, backend: LoraBackend, rows: int, device: Any) -> Part:
        return LoraPart(slots, stack, backend, rows, device)


def _copy_lora(regions: list[torch.Tensor], sources: list[torch.Tensor], factors: list[float]) -> None:
    """The C extension's transposing copy where it applies (CPU stacks), PyTorch for the rest."""
    rest = cpu_c.copy_transposed(regions, sources, factors)
    if rest[0]:
        copy_scaled(*rest)


def _write_from_file(stack: Any, slot: int, form: LoraForm) -> bool:
    """A form over a file's bytes (:class:`LoraDeltas`) whose modules and shapes the CPU stacks already
    have is written without making one tensor of it: where each A and B lies in the bytes, where the
    slot lies in the stacks, one C call for all (0.5 ms for an 84-tensor adapter, 2 ms through views).
    False when that does not apply (the generic write then runs)."""
    deltas = form.deltas
    if not (isinstance(deltas, LoraDeltas) and deltas.in_file) or len(deltas) != len(stack.tensors):
        return False
    layout, dtype = _layout(stack)
    if dtype is None:
        return False
    jobs, f32 = [], torch.float32
    for module in deltas:
        where = layout.get(module)
        if where is None:
            return False
        (a, b), ((at, a_step, a_shape, a_ld), (bt, b_step, b_shape, b_ld)) = deltas.raw(module), where
        if a.dtype != f32 or b.dtype != f32 or a.shape[::-1] != a_shape or b.shape[::-1] != b_shape:
            return False
        jobs.append((a.address, at + slot * a_step, a.shape[0], a.shape[1], a_ld, 1.0))
        jobs.append((b.address, bt + slot * b_step, b.shape[0], b.shape[1], b_ld, form.scales.get(module, 1.0)))
    cpu_c.transpose_raw(jobs, dtype)
    return True


def _layout(stack: Any) -> tuple[dict[str, list[tuple]], torch.dtype | None]:
    """name -> per stack tensor (address, bytes per slot, slot shape, row stride), and their dtype;
    None where the C copy cannot write them. Remade when the stacks are replaced (grown)."""
    cached = stack.derived.get("lora_layout")
    if cached is None or cached[0] is not stack.tensors:
        stacks = [t for ts in stack.tensors.values() for t in ts]
        dtypes = {t.dtype for t in stacks}
        ok = (len(dtypes) == 1 and all(t.is_cpu and t.is_contiguous() for t in stacks)
              and cpu_c.copies_raw(next(iter(dtypes))))
        cached = (stack.tensors, {
            name: [(t.data_ptr(), t.stride(0) * t.element_size(), tuple(t.shape[1:]), t.stride(1)) for t in ts]
            for name, ts in stack.tensors.items()}, next(iter(dtypes)) if ok else None)
        stack.derived["lora_layout"] = cached
    return cached[1], cached[2]


class LoraPart(Part):
    def __init__(self, slots: Slots, stack: Any, backend: LoraBackend, rows: int, device: Any):
        self.slots, self.backend, self.rows, self.device = slots, backend, rows, device
        self.stacks = stack.tensors
        self.output_modules = frozenset(self.stacks)
        self.shared_slot = slots.shared()
        self.shared = stack.dense(self.shared_slot) if self.shared_slot is not None else {}
        self.early = frozenset(m for m, (At, _) in self.stacks.items() if backend.supports(At.dtype, At.shape[2])) \
            if backend.overlap and self.shared_slot is None else frozenset()
        self.input_modules = self.early
        self._tokens_of: dict[tuple[int, int], TokenSlots] = {}
        self._pending: dict[str, Any] = {}

    def _tokens(self, k: int, tokens: int, num_slots: int) -> TokenSlots:
        """Slot and weight of every token for slot position ``k`` (built once per step, shared by modules)."""
        key = (k, tokens)
        if key not in self._tokens_of:
            s = self.slots
            self._tokens_of[key] = TokenSlots.from_rows([r[k] for r in s.host_index], [r[k] for r in s.host_weight],
                                                        tokens, num_slots, self.device)
        return self._tokens_of[key]

    def before(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """Hand the module's deltas for input ``x`` to the backend to run meanwhile; a backend that
        declines now leaves them to :meth:`after`, in line."""
        At, Bt = self.stacks[module]
        tokens = x.numel() // At.shape[1] // self.rows
        pending = self.backend.start(x, [(At, Bt, self._tokens(k, tokens, At.shape[0]))
                                         for k in range(len(self.slots.host_index[0]))])
        if pending is not None:
            self._pending[module] = pending
        return x

    def after(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if module in self._pending:
            return self._pending.pop(module).finish(out)
        if out.dtype == torch.promote_types(out.dtype, self.stacks[module][0].dtype) and out.is_contiguous():
            self._delta(module, x, into=out.view(-1, out.shape[-1]))  # this forward's own tensor
            return out
        return out + self._delta(module, x).to(out.dtype).view(out.shape)

    def _delta(self, module: str, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_k w[b,k] * (x_b @ A[slot].T) @ B[slot].T`` as ``[B * T, out]``, added to ``into`` when given."""
        At, Bt = self.stacks[module]
        width, out = At.shape[1], Bt.shape[2]
        if self.shared_slot is not None:
            a, b = self.shared[module]
            h = torch.mm(x.reshape(-1, width).to(a.dtype), a)
            if into is None:
                return torch.mm(h, b)
            # the dense copy is float32; a half-precision base adds its delta in its own dtype
            return into.addmm_(h, b) if into.dtype == h.dtype else into.add_(torch.mm(h, b).to(into.dtype))
        flat = x.reshape(-1, width)
        tokens = flat.shape[0] // self.rows
        target = into if into is not None else flat.new_zeros(flat.shape[0], out, dtype=torch.float32)
        for k in range(len(self.slots.host_index[0])):  # slot positions of a composition, not adapters
            self.backend.add(flat, At, Bt, self._tokens(k, tokens, At.shape[0]), target)
        return target

    def drain(self) -> None:
        """Wait for every queued job (a pass that raised may leave some): their tensors are released only then."""
        for pending in self._pending.values():
            pending.wait()
        self._pending.clear()
        if self.early:
            self.backend.pass_ends()
