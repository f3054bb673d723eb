"""The CPU kernel for LoRA over a mixed batch (``_bgmv.c``), behind checks that make it safe to call.

With many distinct adapters in a batch, a decode step is bound by reading every row's adapter from
memory. The plain-torch backend (:mod:`.lora_backends.reference`) reaches about half of one core's
memory bandwidth on it; the C kernel fuses ``x @ A`` and the product with ``B`` per token, lets
tokens that share an adapter read it once, skips rows without one, and streams with prefetches.

The extension is optional: without a C compiler at install time (or on another device than the
CPU) the engine takes the plain-torch backend; :func:`describe` says which one runs. The kernel
runs on one thread; with more torch threads, the tokens are split over a few worker threads (the
kernel releases the GIL). The same extension holds the decode-step attention kernel
(:func:`decode_attention`) and the slot writes' transposing copy.

One entry: the CPU backend (:mod:`.lora_backends.cpu_c`) is the only module that imports this
one; the LoRA kind and :mod:`.attention` reach the kernels through it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import threading
from typing import Iterator

import torch

try:
    from . import _bgmv
except ImportError:  # built without a C compiler: the plain-torch backend
    _bgmv = None

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_RANK = 1024
_MIN_TOKENS_PER_THREAD = 8  # below this, waking a worker costs more than it saves

_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0


def available(device: torch.device | str = "cpu") -> bool:
    return _bgmv is not None and torch.device(device).type == "cpu"


def isas() -> tuple[str, ...]:
    """The instruction sets this CPU can run the kernel with, best last (empty: not built)."""
    return tuple(_bgmv.ISAS) if _bgmv is not None else ()


def describe(device: torch.device | str = "cpu") -> str:
    if available(device):
        return f"C kernel ({isas()[-1]})"
    reason = "the C extension was not built" if _bgmv is None else f"the base is on {torch.device(device).type}"
    return f"plain torch ({reason})"


def supports(stack_dtype: torch.dtype, rank: int) -> bool:
    return _bgmv is not None and stack_dtype in DTYPES and rank <= MAX_RANK


class Tokens:
    """Which adapter slot (and weight) each token of a batch uses, checked once per step.

    ``order`` holds the tokens that use an adapter (slot > 0, weight != 0), sorted by slot so that
    tokens sharing one are neighbours (stable: a prompt's tokens stay together).
    """

    def __init__(self, slots: torch.Tensor, weights: torch.Tensor | None, num_slots: int):
        slots = slots.to("cpu", torch.int64).contiguous()
        if weights is not None:
            weights = weights.to("cpu", torch.float32).contiguous()
        if slots.dim() != 1 or (weights is not None and weights.shape != slots.shape):
            raise ValueError(f"slots {tuple(slots.shape)} and weights must be one value per token")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
            raise ValueError(f"slots outside [0, {num_slots})")
        use = slots > 0 if weights is None else (slots > 0) & (weights != 0)
        chosen = use.nonzero().flatten()
        self.order = chosen[torch.argsort(slots[chosen], stable=True)].contiguous()
        self.slots, self.weights, self.num_slots = slots, weights, num_slots

    def __len__(self) -> int:
        return self.slots.numel()


def lora_add(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tokens: Tokens, y: torch.Tensor, *,
             isa: str | None = None, threads: int | None = None) -> None:
    """``y[t] += w[t] * (x[t] @ A[slot[t]]) @ B[slot[t]]`` for every token ``t`` of ``tokens.order``.

    ``x [T, in]`` and ``y [T, out]`` float32 (``y``'s rows may be strided, its columns not),
    ``A [S, in, r]`` and ``B [S, r, out]`` contiguous CPU stacks in one of :data:`DTYPES`. Shapes and
    dtypes are checked here, slots in :class:`Tokens`, before the C code trusts them.
    """
    _check(x, A, B, tokens, y)
    choice = -1 if isa is None else isas().index(isa)
    order = tokens.order
    n_threads = min(threads or torch.get_num_threads(), max(1, order.numel() // _MIN_TOKENS_PER_THREAD))
    w = tokens.weights
    head = (x.data_ptr(), A.data_ptr(), B.data_ptr(), tokens.slots.data_ptr(), 0 if w is None else w.data_ptr())
    tail = (x.shape[1], A.shape[2], B.shape[2], y.stride(0), DTYPES[A.dtype], choice)

    def run(part: torch.Tensor) -> None:
        _bgmv.lora_add(*head, part.data_ptr(), y.data_ptr(), part.numel(), *tail)

    if n_threads <= 1:
        return run(order)
    parts = order.tensor_split(n_threads)  # whole tokens per part: no two threads write one row
    futures = [_workers(n_threads - 1).submit(run, part) for part in parts[1:]]
    run(parts[0])
    for future in futures:
        future.result()


class Queued:
    """A :func:`lora_add_queued` job: holds its tensors until :meth:`wait` saw it run."""

    def __init__(self, ticket: int, tensors: tuple):
        self._ticket, self._tensors = ticket, tensors

    def wait(self) -> None:
        if self._tensors is not None:
            _bgmv.lora_wait(self._ticket)
            self._tensors = None


def lora_busy(on: bool) -> int:
    """A forward pass that queues jobs begins (True) or ends (False); returns how many are busy now.
    While any is, the worker spins between jobs instead of sleeping (waking a thread costs about as
    much as a small job)."""
    return _bgmv.lora_busy(on)


@contextlib.contextmanager
def yielding_cores() -> Iterator[None]:
    """Work on this thread (an adapter load) wants the cores: meanwhile the worker and the threads
    waiting for its jobs sleep after a short spin instead of spinning through a busy pass."""
    if _bgmv is None:
        yield
        return
    _bgmv.lora_yield(True)
    try:
        yield
    finally:
        _bgmv.lora_yield(False)


def cores_wanted() -> bool:
    """Whether an adapter load is running (:func:`yielding_cores`): a forward pass then adds its
    LoRA in line rather than queue it, leaving the other core to the load."""
    return _bgmv is not None and _bgmv.lora_yielding()


def lora_add_queued(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tokens: Tokens, y: torch.Tensor) -> Queued:
    """:func:`lora_add`, queued on the extension's worker thread (one, jobs in order) while the
    caller goes on; ``y`` holds the result once ``wait()`` returned. For a spare core: the gathers
    are bound by memory, the base layer's matmul that the caller runs meanwhile by arithmetic.
    The caller must not touch ``y`` (nor change x, A, B) before ``wait()``."""
    _check(x, A, B, tokens, y)
    w = tokens.weights
    ticket = _bgmv.lora_add_async(x.data_ptr(), A.data_ptr(), B.data_ptr(), tokens.slots.data_ptr(),
                                  0 if w is None else w.data_ptr(), tokens.order.data_ptr(), y.data_ptr(),
                                  tokens.order.numel(), x.shape[1], A.shape[2], B.shape[2], y.stride(0), DTYPES[A.dtype])
    return Queued(ticket, (x, A, B, tokens, y))


def copy_transposed(regions: list[torch.Tensor], sources: list[torch.Tensor],
                    factors: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """``regions[i] = factors[i] * sources[i]`` for the transposed float32 sources (a LoRA slot
    write: the file's ``A [r, in]`` and ``B [out, r]`` into the stacks' ``[in, r]`` and ``[r, out]``
    with B's scaling, ~3x faster than PyTorch's strided copy of such skinny matrices and a multiply
    of its own). Returns the ``(regions, sources, factors)`` it did not take, for PyTorch."""
    jobs: dict[torch.dtype, list[tuple[int, int, int, int, int, float]]] = {}
    rest: tuple[list, list, list] = ([], [], [])
    f32 = torch.float32
    for dst, src, factor in zip(regions, sources, factors):
        shape, into = src.shape, dst.stride()  # a transposed view of a contiguous [cols, rows] tensor has strides (1, cols)
        if (_bgmv is not None and len(shape) == 2 and src.dtype == f32 and src.stride() == (1, shape[0])
                and dst.dtype in DTYPES and dst.shape == shape and into[1] == 1 and src.is_cpu and dst.is_cpu):
            jobs.setdefault(dst.dtype, []).append((src.data_ptr(), dst.data_ptr(), shape[1], shape[0], into[0], factor))
        else:
            for bucket, item in zip(rest, (dst, src, factor)):
                bucket.append(item)
    for dtype, batch in jobs.items():
        _bgmv.transpose_into(batch, DTYPES[dtype])
    return rest


def transpose_raw(jobs: list[tuple[int, int, int, int, int, float]], dtype: torch.dtype) -> None:
    """:func:`copy_transposed` for callers that computed the addresses themselves: each job
    ``(source, target, rows, cols, target row stride, factor)``, float32 ``[rows, cols]`` source,
    target elements of ``dtype``. Unchecked: the caller vouches for every address and extent."""
    _bgmv.transpose_into(jobs, DTYPES[dtype])


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None, *, isa: str | None = None) -> torch.Tensor:
    """One decode step's attention, ``[B, 1, H, D]``, in one pass over the cached keys and values
    (read in place through their strides). Unchecked: :mod:`.attention` passes only inputs it
    accepted (one query token per row, float32 CPU tensors, contiguous head dims, a boolean mask)."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    out = query.new_empty(batch, 1, heads, dim)
    if attention_mask is None:
        mask, mask_stride = 0, 0
    else:
        mask, mask_stride = attention_mask.data_ptr(), attention_mask.stride(0) if attention_mask.shape[0] == batch else 0
    strides = (query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0),
               value.stride(1), value.stride(2), mask_stride, out.stride(0), out.stride(2))
    _bgmv.decode_attention(query.data_ptr(), key.data_ptr(), value.data_ptr(), mask, out.data_ptr(), batch, heads,
                           kv_heads, length, dim, strides, scaling if scaling is not None else 1 / math.sqrt(dim),
                           -1 if isa is None else isas().index(isa))
    return out


def _workers(n: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="adapterhub-bgmv"), n
        return _pool


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tokens: Tokens, y: torch.Tensor) -> None:
    if _bgmv is None:
        raise RuntimeError("the C kernel adapterhub.serve._bgmv is not built; reinstall with a C compiler present")
    ok = (A.dtype in DTYPES and B.dtype == A.dtype and A.dim() == 3 and B.dim() == 3
          and A.shape[0] == B.shape[0] == tokens.num_slots and A.shape[2] == B.shape[1] and A.shape[2] <= MAX_RANK
          and A.is_contiguous() and B.is_contiguous() and A.device.type == B.device.type == "cpu"
          and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and x.device.type == "cpu"
          and x.shape == (len(tokens), A.shape[1])
          and y.dtype == torch.float32 and y.dim() == 2 and y.device.type == "cpu" and y.stride(1) == 1
          and y.shape == (len(tokens), B.shape[2]))
    if not ok:
        raise ValueError(
            f"lora_add: x {x.dtype} {tuple(x.shape)}, y {y.dtype} {tuple(y.shape)} strides {y.stride()} for "
            f"{len(tokens)} tokens do not fit contiguous CPU stacks A {A.dtype} {tuple(A.shape)}, B {B.dtype} "
            f"{tuple(B.shape)} with {tokens.num_slots} slots (float32 x and y; stacks in {sorted(map(str, DTYPES))}; "
            f"rank at most {MAX_RANK})")
