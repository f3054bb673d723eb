"""The C kernels (:mod:`..bgmv`): the CPU's LoRA backend, with all of its thread policy, and the
one way into the extension for the rest of the server.

Besides :meth:`add`, it can run a module's LoRA on its worker thread while the base layer runs
(:meth:`start`, then :meth:`QueuedDeltas.finish`): with a core to spare the gathers (bound by memory)
overlap the base matmul (bound by arithmetic). It declines while an adapter load wants the cores
(:meth:`loading`), and keeps its worker spinning between the jobs of one forward pass (the first
:meth:`start` of a pass until :meth:`pass_ends`). Nothing outside this module knows about threads.

The same extension copies LoRA slots (:func:`copy_transposed`, :func:`transpose_raw`, used by the
LoRA kind whichever backend runs the deltas) and runs decode-step attention
(:func:`decode_attention`, used by :mod:`...attention`): they are reached through here, so nothing
else imports :mod:`..bgmv`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .. import bgmv
from .contract import LoraBackend, TokenSlots


def available() -> bool:
    """Whether the C extension was built (the kernels run on the CPU only)."""
    return bgmv.available("cpu")


def spare_core() -> bool:
    """Whether this process may run on more cores than torch's threads use: then by default a
    mixed batch's LoRA runs on that core beside the base layers (``--lora-overlap auto``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def isas() -> tuple[str, ...]:
    """The instruction sets the kernels can use on this CPU, best last (empty: not built)."""
    return bgmv.isas()


def copy_transposed(regions: list[torch.Tensor], sources: list[torch.Tensor],
                    factors: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """A slot write's scaled, transposing copy where the C copy applies (CPU stacks, float32
    sources); returns the ``(regions, sources, factors)`` it left for PyTorch."""
    return bgmv.copy_transposed(regions, sources, factors)


def copies_raw(dtype: torch.dtype) -> bool:
    """Whether :func:`transpose_raw` writes stacks of ``dtype``."""
    return bgmv.available() and bgmv.supports(dtype, 0)


def transpose_raw(jobs: list[tuple[int, int, int, int, int, float]], dtype: torch.dtype) -> None:
    """The copy from addresses the caller computed (a file's bytes into the stacks); unchecked."""
    bgmv.transpose_raw(jobs, dtype)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None, *, isa: str | None = None) -> torch.Tensor:
    """Decode-step attention in one pass over the cache (inputs :mod:`...attention` accepted)."""
    return bgmv.decode_attention(query, key, value, attention_mask, scaling, isa=isa)


class CLora(LoraBackend):
    name = "c"

    def __init__(self, overlap: bool = False):
        self.overlap = overlap  # run mixed batches' LoRA on the worker thread (a spare core)
        self._busy = False

    def supports(self, stack_dtype: torch.dtype, rank: int) -> bool:
        return bgmv.supports(stack_dtype, rank)

    def _tokens(self, tokens: TokenSlots) -> bgmv.Tokens:
        """The kernel's view of the tokens (sorted by slot), made once per step and slot position."""
        made = tokens.cache.get(self.name)
        if made is None:
            made = tokens.cache[self.name] = bgmv.Tokens(tokens.slots, tokens.weights, tokens.num_slots)
        return made

    def add(self, x: torch.Tensor, A_T: torch.Tensor, B_T: torch.Tensor, tokens: TokenSlots, out: torch.Tensor) -> None:
        flat = x.float().contiguous()
        direct = out.dtype == torch.float32 and out.stride(1) == 1
        target = out if direct else flat.new_zeros(flat.shape[0], B_T.shape[2])
        bgmv.lora_add(flat, A_T, B_T, self._tokens(tokens), target)
        if not direct:
            out += target.to(out.dtype)

    # -- overlap with the base layer ----------------------------------------------------------------

    def start(self, x: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, TokenSlots]]) -> "QueuedDeltas | None":
        """Queue the deltas of ``parts`` (one per slot position) for input ``x`` on the worker; None
        when this pass should add them in line instead (overlap off, or a load wants the cores)."""
        if not self.overlap or bgmv.cores_wanted():
            return None
        if not self._busy:
            bgmv.lora_busy(True)
            self._busy = True
        flat = x.reshape(-1, parts[0][0].shape[1]).float().contiguous()
        delta = flat.new_zeros(flat.shape[0], parts[0][1].shape[2])
        return QueuedDeltas([bgmv.lora_add_queued(flat, A_T, B_T, self._tokens(t), delta) for A_T, B_T, t in parts], delta)

    def pass_ends(self) -> None:
        """A forward pass is over (its pending jobs were waited for): the worker may sleep."""
        if self._busy:
            bgmv.lora_busy(False)
            self._busy = False

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """An adapter load runs meanwhile: passes add their LoRA in line and leave it the other core."""
        with bgmv.yielding_cores():
            yield


class QueuedDeltas:
    """Queued deltas of one module (a :class:`~.contract.Pending`): :meth:`finish` waits for them
    and adds them to ``out``."""

    def __init__(self, jobs: list[bgmv.Queued], delta: torch.Tensor):
        self.jobs, self.delta = jobs, delta

    def wait(self) -> None:
        for job in self.jobs:
            job.wait()

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        self.wait()
        if out.dtype == torch.float32 and out.is_contiguous():
            out.view(-1, out.shape[-1]).add_(self.delta)
            return out
        return out + self.delta.to(out.dtype).view(out.shape)
