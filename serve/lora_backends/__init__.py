"""LoRA over a mixed batch, one backend per device, chosen once when the engine starts.

Every backend computes the same thing, in place::

    out[t] += w[t] * (x[t] @ A_T[s[t]]) @ B_T[s[t]]      for every token t with s[t] != 0

``A_T [S, in, R]`` and ``B_T [S, R, out]`` are a slot pool's stacks (slot 0 is "no adapter",
ranks zero-padded), ``s``/``w`` the slot and weight of each token (:class:`TokenSlots`). The
plain-torch backend (:mod:`.reference`) runs on any device and is what every other backend is
tested against: the C kernel on the CPU (:mod:`.cpu_c`), Triton's SGMV-style kernels on CUDA
(:mod:`.triton_sgmv`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

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


class LoraBackend(Protocol):
    name: str

    def supports(self, stack_dtype: torch.dtype, rank: int) -> bool:
        """Whether :meth:`add` takes stacks of this dtype and (padded) rank."""

    def add(self, x: torch.Tensor, A_T: torch.Tensor, B_T: torch.Tensor, tokens: TokenSlots, out: torch.Tensor) -> None:
        """``out [T, out] += w * (x [T, in] @ A_T[s]) @ B_T[s]`` per token, in place (accumulating in float32)."""


CHOICES = ("auto", "c", "triton", "torch")


def select(device: torch.device | str, choice: str = "auto", *, overlap: bool = False) -> LoraBackend:
    """The backend for ``device``, chosen once: ``auto`` = the C kernel on the CPU (where built),
    Triton on CUDA (where installed), else the plain-torch reference. A named one that cannot run
    there is a ConfigError naming what to use instead."""
    from adapterhub.errors import ConfigError

    from . import cpu_c

    kind = torch.device(device).type
    has_triton = False
    if kind == "cuda":  # triton is imported only where it may run
        try:
            from . import triton_sgmv
            has_triton = triton_sgmv.available()
        except ImportError:
            pass
    if choice not in CHOICES:
        raise ConfigError(f"--lora-backend {choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "auto":
        choice = ("c" if kind == "cpu" and cpu_c.available() else
                  "triton" if kind == "cuda" and has_triton else "torch")
    if choice == "c":
        if kind != "cpu" or not cpu_c.available():
            raise ConfigError(f"--lora-backend c runs on the CPU with the C extension built "
                              f"(device {device}, built: {cpu_c.available()}); use auto or torch")
        return cpu_c.CLora(overlap=overlap)
    if choice == "triton":
        if kind != "cuda" or not has_triton:
            raise ConfigError(f"--lora-backend triton runs on CUDA with triton installed (device {device}); "
                              "use auto or torch")
        return triton_sgmv.TritonLora()
    from .reference import TorchLora

    return TorchLora()
