"""What every LoRA backend is: :class:`LoraBackend`, the one interface the LoRA kind calls, and
:class:`TokenSlots`, the per-token slots and weights it receives.

Kept apart from the package's ``__init__`` (which only chooses a backend), so that the backends
and the kinds import the contract without importing each other.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import ContextManager, Protocol, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class TokenSlots:
    """The slot and weight of each of ``T`` tokens, and the same as runs ("segments") of neighbouring
    tokens that share both: a request's prompt is one run, a decode step's rows of one adapter too.

    Built once per step and slot position from host lists (no device synchronisation); the
    tensors live on the batch's device.
    """

    slots: torch.Tensor  # [T] int64: slot of each token (0 = none)
    weights: torch.Tensor | None  # [T] float32, or None when every weight is 1
    seg_starts: torch.Tensor  # [G] int32: segment g is tokens seg_starts[g] .. seg_starts[g] + seg_lens[g] - 1
    seg_lens: torch.Tensor  # [G] int32 (tokens between segments have slot 0 or weight 0)
    seg_slots: torch.Tensor  # [G] int32: its slot (no segment has slot 0)
    seg_weights: torch.Tensor  # [G] float32: its weight
    segments: tuple[tuple[int, int, int, float], ...]  # (start, end, slot, weight) on the host
    num_slots: int  # slots in the stacks (the largest index + 1 a backend may see)
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # a backend's own derived data

    @classmethod
    def from_rows(cls, row_slots: Sequence[int], row_weights: Sequence[float], tokens_per_row: int, num_slots: int,
                  device: torch.device | str = "cpu") -> "TokenSlots":
        """For a batch of rows of ``tokens_per_row`` tokens each, every token taking its row's slot
        and weight: segments come from the rows (neighbours with the same adapter merge), no loop
        over tokens."""
        if any(s < 0 or s >= num_slots for s in row_slots):
            raise ValueError(f"slots outside [0, {num_slots})")
        segments: list[list] = []
        for b, (slot, weight) in enumerate(zip(row_slots, row_weights)):
            if slot == 0 or weight == 0:
                continue
            start = b * tokens_per_row
            if segments and segments[-1][1] == start and segments[-1][2:] == [slot, weight]:
                segments[-1][1] = start + tokens_per_row
            else:
                segments.append([start, start + tokens_per_row, int(slot), float(weight)])
        slots = torch.tensor(list(row_slots), dtype=torch.int64).repeat_interleave(tokens_per_row)
        all_one = all(w == 1.0 for w in row_weights)
        weights = None if all_one else torch.tensor(list(row_weights), dtype=torch.float32).repeat_interleave(tokens_per_row)
        return cls._make(slots, weights, [tuple(s) for s in segments], num_slots, device)

    @property
    def max_segment(self) -> int:
        return max((end - start for start, end, _, _ in self.segments), default=0)

    @classmethod
    def build(cls, slots: Sequence[int], weights: Sequence[float], num_slots: int,
              device: torch.device | str = "cpu") -> "TokenSlots":
        """From per-token host lists; runs of equal (slot, weight) become segments, slot 0 drops out."""
        if len(slots) != len(weights):
            raise ValueError(f"{len(slots)} slots but {len(weights)} weights: one of each per token")
        if any(s < 0 or s >= num_slots for s in slots):
            raise ValueError(f"slots outside [0, {num_slots})")
        segments: list[tuple[int, int, int, float]] = []
        start = 0
        for t in range(1, len(slots) + 1):
            if t == len(slots) or (slots[t], weights[t]) != (slots[start], weights[start]):
                if slots[start] != 0 and weights[start] != 0:
                    segments.append((start, t, int(slots[start]), float(weights[start])))
                start = t
        all_one = all(w == 1.0 for w in weights)
        return cls._make(torch.tensor(list(slots), dtype=torch.int64),
                         None if all_one else torch.tensor(list(weights), dtype=torch.float32), segments, num_slots, device)

    @classmethod
    def _make(cls, slots: torch.Tensor, weights: torch.Tensor | None, segments: list, num_slots: int,
              device: torch.device | str) -> "TokenSlots":
        return cls(
            slots=slots.to(device),
            weights=None if weights is None else weights.to(device),
            seg_starts=torch.tensor([s for s, _, _, _ in segments], dtype=torch.int32).to(device),
            seg_lens=torch.tensor([e - s for s, e, _, _ in segments], dtype=torch.int32).to(device),
            seg_slots=torch.tensor([s for _, _, s, _ in segments], dtype=torch.int32).to(device),
            seg_weights=torch.tensor([w for _, _, _, w in segments], dtype=torch.float32).to(device),
            segments=tuple(segments), num_slots=num_slots)


class Pending(Protocol):
    """Deltas a backend runs beside the base layer (:meth:`LoraBackend.start`)."""

    def wait(self) -> None:
        """Block until every queued job ran (its tensors may be released only then)."""

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Wait, then return ``out`` with the deltas added (in place where it can)."""


class LoraBackend(abc.ABC):
    """LoRA over a mixed batch on one device. The engine and the LoRA kind call only these; a
    backend with no worker thread keeps the defaults (``start`` declines, the rest do nothing)."""

    name: str = ""
    overlap: bool = False  # whether :meth:`start` may run deltas beside the base layer

    @abc.abstractmethod
    def supports(self, stack_dtype: torch.dtype, rank: int) -> bool:
        """Whether :meth:`add` takes stacks of this dtype and (padded) rank."""

    @abc.abstractmethod
    def add(self, x: torch.Tensor, A_T: torch.Tensor, B_T: torch.Tensor, tokens: TokenSlots, out: torch.Tensor) -> None:
        """``out [T, out] += w * (x [T, in] @ A_T[s]) @ B_T[s]`` per token, in place (accumulating in float32)."""

    def start(self, x: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, TokenSlots]]) -> Pending | None:
        """Queue a module's deltas (one ``(A_T, B_T, tokens)`` per slot position) for input ``x`` to
        run while the base layer does; None: this pass adds them in line with :meth:`add`."""
        return None

    def pass_ends(self) -> None:
        """A forward pass that queued work is over (its pending jobs were waited for)."""

    def loading(self) -> ContextManager[None]:
        """Held while an adapter loads (the cache's loading thread): a backend that keeps cores
        busy between jobs lets the load have them meanwhile."""
        return contextlib.nullcontext()
