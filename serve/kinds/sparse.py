"""Sparse weight changes (``SparseForm``, SHiRA): per row ``w * x @ S.T`` added to a module's output.

The stacks hold each adapter's positions (``[S, 2, nnz]``, int64) and values (``[S, nnz]``,
float32), padded with value 0 at position (0, 0) where adapters differ in size. A step groups its
rows by adapter (per slot position of a composition, from the host's copy of the slots: no device
sync) and multiplies each group's tokens by that adapter's ``S`` as a CSR matrix, made once per
adapter and module while its slot is unchanged: ``nnz`` multiply-adds per token, what a rank-r LoRA
costs, with nothing of size tokens x nnz in between (a gather over the nonzeros per row would be
exact too, but holds that: about 15x slower in a CPU prefill). Exact up to summation order: PEFT
adds ``S`` to a copy of ``W`` and multiplies once, we multiply twice and add.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from adapterhub.errors import LimitExceeded
from adapterhub.serving_forms import SparseForm

from .base import Part, Slots, StackedKind, write_parts


class SparseKind(StackedKind):
    name = "sparse"
    form_type = SparseForm

    def stack_dtype(self, pool: Any) -> torch.dtype | None:
        return None  # integer positions beside float32 values (each part keeps its own dtype)

    def write(self, stack: Any, slot: int, form: SparseForm) -> None:
        write_parts(stack, slot, {m: (i.to(torch.long), v.to(torch.float32)) for m, (i, v) in form.deltas.items()})

    def check_company(self, key: str, others: Sequence[Any]) -> None:
        if any(o is not None and any(k.name == "dora" for k in o.kinds) for o in others):
            raise LimitExceeded(
                f"adapter {key} is a sparse weight change and another adapter of the request is DoRA, whose "
                "magnitude rescales the layers both change: the composition has no defined result; compose "
                "sparse adapters with LoRA, IA3, BitFit, bottleneck adapters or prefixes")

    def part(self, slots: Slots, stack: Any, backend: Any, rows: int, device: Any) -> Part:
        return SparsePart(slots, Matrices.of(stack), device)


class Matrices:
    """Each slot's ``S`` per module as a CSR matrix ``[out, in]``, made when first asked; all dropped
    when the stacks are replaced (grown) or any slot is written (a reused slot holds another adapter)."""

    def __init__(self, stack: Any):
        self.tensors, self.writes = stack.tensors, stack.writes
        self.made: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def of(cls, stack: Any) -> "Matrices":
        current = stack.derived.get("sparse")
        if current is None or current.tensors is not stack.tensors or current.writes != stack.writes:
            current = stack.derived["sparse"] = cls(stack)
        return current

    def get(self, slot: int, module: str, shape: tuple[int, int]) -> torch.Tensor:
        key = (slot, module)
        if key not in self.made:
            indices, values = (t[slot] for t in self.tensors[module])
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                # padding entries (value 0 at (0, 0)) sum into one harmless zero when coalesced
                self.made[key] = torch.sparse_coo_tensor(indices, values, shape).coalesce().to_sparse_csr()
        return self.made[key]


class SparsePart(Part):
    def __init__(self, slots: Slots, matrices: Matrices, device: Any):
        self.matrices = matrices
        self.output_modules = frozenset(matrices.tensors)
        # per slot position: (slot, rows or None for every row, their weights or None for all 1)
        self.groups: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
        for k in range(len(slots.host_index[0])):
            by_slot: dict[int, list[int]] = {}
            for row, index in enumerate(slots.host_index):
                if index[k]:
                    by_slot.setdefault(index[k], []).append(row)
            for slot, members in by_slot.items():
                weights = [slots.host_weight[row][k] for row in members]
                every = len(members) == len(slots.host_index)
                self.groups.append((
                    slot,
                    None if every else torch.tensor(members, dtype=torch.long, device=device),
                    None if all(w == 1.0 for w in weights) else torch.tensor(weights, device=device)))
        self.rows = len(slots.host_index)

    def after(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        width, out_features = x.shape[-1], out.shape[-1]
        x3, shaped = x.reshape(self.rows, -1, width), out.reshape(self.rows, -1, out_features)
        for slot, rows, weights in self.groups:
            matrix = self.matrices.get(slot, module, (out_features, width))
            xs = x3 if rows is None else x3.index_select(0, rows)
            delta = torch.sparse.mm(matrix, xs.reshape(-1, width).T.float().contiguous()).T  # [n * T, out]
            delta = delta.reshape(xs.shape[0], -1, out_features)
            if weights is not None:
                delta = delta * weights[:, None, None]
            delta = delta.to(out.dtype)
            shaped = shaped + delta if rows is None else shaped.index_add(0, rows, delta)
        return shaped.view(out.shape)
