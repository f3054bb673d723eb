"""The engine: one base model, an adapter cache, and a scheduler thread doing iteration-level batching.

Request threads tokenize, resolve references (tags resolve *now*) and load adapters (off the
engine lock), then enqueue a :class:`Sequence`. The scheduler thread keeps a running batch: before
each decode step it admits waiting sequences (up to ``max_batch``) and drops finished, cancelled or
expired ones, then runs ONE forward pass for all rows, each row with its own adapters (see
:mod:`batch_plan` and :mod:`kinds`). A sequence holds its adapters until it finishes, so a tag moved or an adapter evicted
meanwhile does not change a running request.

Decoding keeps a key/value cache (:class:`KVBatch`; the passes are :mod:`forward_pass`'s): a
request joining the batch is prefilled once (with the other newcomers of that step, left-padded,
its prefix adapters' keys/values in front), its cache is spliced into the running batch's, and from
then on every step feeds ONE token per row.
Rows leave by an ``index_select`` of the cache; the cache sits in buffers with spare columns, so a
step writes its token in place instead of re-concatenating. Adapter tensors stay in the device
slot pool (:class:`~.slot_pool.SlotPool`) while resident, so a step applies them with a fixed
number of gathered matmuls (the LoRA backend's) whatever the mix of adapters.

Adapters without a serving form (``freeze``, ``full``: whole weight matrices) take the exclusive
path when they reach the head of the queue: the running batch pauses (its caches kept), the method
attaches its adapter to the base (``method.load``), ``generate`` runs that request alone,
``method.detach`` (on a quantized base: a fresh copy of the base, see :mod:`exclusive`), and the
batch resumes. So such a request stalls the others for about its own time, no longer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Callable

import torch

from adapterhub.chat import render_prompt
from adapterhub.errors import AdapterHubError, LimitExceeded, Overloaded

from . import attention, fused_norm, lora_backends, one_pass, prepack
from .cache import AdapterCache, LoadedAdapter
from .errors import RequestTimeout, RowFailed, ShuttingDown, StepFailed
from .exclusive import generate_alone
from .forward_pass import ForwardPasses, take_chunks
from .isolation import isolate
from .kinds import check_composition
from .kv_batch import KVBatch
from .lora_backends import LoraBackend
from .prefix_cache import PrefixCache
from .requests import GenerationRequest, Limits, ResolvedAdapter
from .requires import with_bottoms
from .sampling import next_tokens
from .sequence import Sequence
from .slot_pool import SlotPool

log = logging.getLogger(__name__)

PREFIX_CACHE_BYTES = 256 * 2**20  # the server's --prefix-cache-mb default
PREFILL_CHUNK = 512  # the server's --prefill-chunk default
# a burst's requests through the HTTP door (16 streaming clients) reached the engine up to 9 ms
# apart; at 1 ms the engine began with the first few and took the rest in one-pass chunks, 4-6%
# more engine time a burst (bench/http_peer.py, base case). A lone request waits this long.
ADMISSION_GAP = 0.01


class Engine:
    """Built by :meth:`create`, which gives each collaborator what it needs; ``cache`` writes into
    the engine's slot pool (``cache.pool``) and ``backend`` runs the mixed batches' LoRA."""

    def __init__(self, base: Any, cache: AdapterCache, backend: LoraBackend, *, limits: Limits = Limits(),
                 max_batch: int = 32, max_queue: int = 256, metrics: Any = None, admission_window: float = 0.05,
                 admission_gap: float = ADMISSION_GAP, prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
                 prefill_chunk: int = PREFILL_CHUNK, weight_prepack: bool = True, fused_projections: bool = True,
                 fused_norms: bool = True, one_pass_steps: bool = True):
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.cache = cache
        self.limits = limits
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.admission_window = admission_window  # see _gather_burst
        self.admission_gap = admission_gap
        self.metrics = metrics
        self.device = next(self.model.parameters()).device
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.fast_attention = attention.install(self.model)  # decode steps' attention in one pass over the cache
        unpacked = prepack.supported(self.model) if weight_prepack else "--weight-prepack off"
        self.packed = (prepack.PackedLinears(self.model, fuse=fused_projections).install()  # see prepack
                       if unpacked is None else None)
        self.norms = fused_norm.FusedNorms(self.model).install() if fused_norms else None  # see fused_norm
        self.backend = backend
        self.pool = cache.pool  # loads write their slots themselves, off the scheduler thread
        self.lora_dtype = self.pool.lora_dtype
        self.prefix_cache = PrefixCache(prefix_cache_bytes)  # prompt keys/values shared across requests (0: off)
        self.prefill_chunk = prefill_chunk  # input tokens a step prefills while other rows decode (0: no limit)
        self.passes = ForwardPasses(self.model, self.pool, backend, pad_id=self.pad_id, prefix_cache=self.prefix_cache)
        self.hooks = self.passes.hooks  # the base's forward hooks that apply a step's adapters
        # a step with newcomers runs as one pass where the engine's attention function is installed
        self.one_pass = self.fast_attention and one_pass_steps
        log.info("mixed-batch LoRA: %s backend on %s%s; decode attention: %s; base weights: %s", backend.name,
                 self.device, " (overlapped with the base layers)" if backend.overlap else "",
                 "C kernel" if self.fast_attention else self.model.config._attn_implementation,
                 f"prepacked (oneDNN), {len(self.packed.groups)} fused groups" if self.packed
                 else f"not prepacked ({unpacked})")
        self._batch: KVBatch | None = None  # the running rows' cache (scheduler thread only)
        self._cond = threading.Condition()
        self._pending: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._exclusive: Sequence | None = None  # the exclusive-path request running now, if any
        self._stopping = False
        self._abort = False  # a stop's grace ran out: the scheduler ends every row at its next step boundary
        self.completed = 0  # requests that finished with a result (a stop reports those it waited for)
        self.ended = 0  # requests a stop ended when its grace ran out
        self._completed_at_drain: int | None = None
        self.largest_batch = 0  # the most rows one decode step has served (tests, metrics)
        self._thread = threading.Thread(target=self._run, name="adapterhub-scheduler", daemon=True)
        self._thread.start()

    @property
    def lora_overlap(self) -> bool:
        """Whether mixed batches' LoRA runs on a core of its own beside the base layers."""
        return self.backend.overlap

    @classmethod
    def create(cls, base: Any, source: Any, *, capacity: int, limits: Limits = Limits(), metrics: Any = None,
               lora_dtype: torch.dtype | None = None, lora_overlap: bool | None = None, lora_backend: str = "auto",
               **kwargs: Any) -> "Engine":
        """An engine on ``base`` serving ``source``'s adapters: the LoRA backend for the base's device
        (``lora_overlap`` None: when torch leaves a core unused), the slot pool on that device, and
        the adapter cache that loads into that pool under the backend's loading guard."""
        model = base.model
        device = next(model.parameters()).device
        backend = lora_backends.select(device, lora_backend, overlap=lora_overlap)
        # LoRA stacks in the base's compute dtype unless asked otherwise: float16 halves the bytes a
        # mixed batch reads per step and each adapter's memory, at ~5e-4 relative error in the delta
        pool = SlotPool(device, lora_dtype=lora_dtype or getattr(model, "dtype", torch.float32), slots=max(8, capacity),
                        model=model)
        cache = AdapterCache(source, capacity=capacity, base_fingerprint=base.fingerprint, base_config=model.config,
                             pool=pool, loading=backend.loading, metrics=metrics)
        limits = Limits(limits.max_new_tokens, limits.max_adapters_per_request,
                        min(limits.context_length, getattr(model.config, "max_position_embeddings", 10**9)))
        return cls(base, cache, backend, limits=limits, metrics=metrics, **kwargs)

    # -- request side (caller threads) ------------------------------------------------------------

    def submit(self, request: GenerationRequest, *, timeout: float | None = None, stream: bool = True,
               events: Any = None) -> Sequence:
        """Tokenize, resolve and load adapters (off the engine lock), then enqueue.

        ``events`` receives the chunks and the final error with ``put(item)`` (default a
        ``queue.Queue``, read by ``chunks()`` / ``result()``; the HTTP door passes one that wakes
        its event loop instead of a waiting thread).

        ``stream=False`` (unary calls) asks for the result only: the engine then skips the
        per-token events, and also the per-token detokenization unless stop strings need the text.
        ``chunks()`` still works and yields one chunk with the whole text.
        """
        if self._stopping:
            raise ShuttingDown(SHUTTING_DOWN)
        prompt_ids = self._tokenize(request)
        adapters = with_bottoms(request.adapters, self.cache.source)  # pinned, with the bottoms they were trained on
        entries: list[tuple[LoadedAdapter, float]] = []
        try:
            for _, spec in adapters:
                entries.append((self.cache.acquire(spec.ref), spec.weight))
            check_composition(entries)
            prefix = sum(e.served.positions + e.served.tokens for e, _ in entries if e.served is not None)
            total = prefix + len(prompt_ids) + request.params.max_new_tokens
            if total > self.limits.context_length:
                field = request.fields.max_new_tokens
                raise LimitExceeded(
                    f"prompt ({len(prompt_ids)} tokens) + prefixes ({prefix}) + {field} "
                    f"({request.params.max_new_tokens}) = {total} exceeds the context length "
                    f"{self.limits.context_length}; shorten the prompt or lower {field}"
                )
        except BaseException:
            for entry, _ in entries:
                self.cache.release(entry)
            raise
        resolved = [ResolvedAdapter(asked, e.key, e.method.name, w) for (asked, _), (e, w) in zip(adapters, entries)]
        deadline = time.monotonic() + timeout if timeout is not None else None
        seq = Sequence(request, prompt_ids, entries, resolved, deadline, stream, events)
        with self._cond:
            if self._stopping:
                self._release(seq)
                raise ShuttingDown(SHUTTING_DOWN)
            if len(self._pending) >= self.max_queue:
                self._release(seq)
                raise Overloaded(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.append(seq)
            self._cond.notify()
        return seq

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            text = render_prompt(self.tokenizer, [{"role": r, "content": c} for r, c in request.messages])
        else:
            text = request.prompt or ""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise LimitExceeded("the prompt is empty after tokenization")
        if len(ids) >= self.limits.context_length:
            raise LimitExceeded(
                f"the prompt is {len(ids)} tokens; the context length is {self.limits.context_length}; shorten it"
            )
        return ids

    # -- scheduler thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            slow: Sequence | None = None
            with self._cond:
                self._exclusive = None
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._abort:  # a stop's grace ran out: end every row here, between steps
                    break
                if self._stopping and not self._pending and not self._active:
                    return
                if not self._active:
                    self._gather_burst()
                while self._pending and len(self._active) < self.max_batch:
                    if self._pending[0].slow:  # now: the running rows pause for it (their caches kept)
                        slow = self._exclusive = self._pending.popleft()  # rather than finishing first while newcomers wait
                        break
                    self._active.append(self._pending.popleft())
            try:
                if slow is not None:
                    self._run_slow(slow)
                else:
                    self._step()
            except Exception as exc:  # never let one bad batch kill the scheduler
                if slow is not None:  # fails that request only: the paused batch resumes untouched
                    self._exclusive_failed(slow, exc)
                    continue
                self._step_failed(list(self._active), exc)
                self.hooks.plan = None
                self._batch = None
        self.ended += self._end_all()
        self._batch = None

    def _gather_burst(self) -> None:
        """From idle, wait (at most ``admission_window``, while requests keep arriving less than
        ``admission_gap`` apart) so that a burst is prefilled as one batch: admitting its first
        request alone costs an extra prefill and a decode step that the rest of the burst then
        trails by (the idea of vLLM's scheduler delay). A burst of 128 takes 12-35 ms to submit
        (tokenizing, resolving adapters), hence a window of 50 ms by default. Called with ``_cond``
        held; a lone request waits one gap (see ``ADMISSION_GAP``)."""
        deadline = time.monotonic() + self.admission_window
        seen = len(self._pending)
        while seen < self.max_batch and not self._stopping and time.monotonic() < deadline:
            self._cond.wait(min(self.admission_gap, max(0.0, deadline - time.monotonic())))
            if len(self._pending) == seen:
                return
            seen = len(self._pending)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for seq in list(self._active):
            if seq.cancelled:
                self._finish_error(seq, None)
            elif seq.deadline is not None and now > seq.deadline:
                self._finish_error(seq, RequestTimeout(
                    f"request {seq.id} passed its deadline after {len(seq.generated)} tokens; "
                    "raise the client deadline or lower max_new_tokens"))

    def _step(self) -> None:
        """Drop dead rows, prefill newcomers into the cache, then decode one token for every row."""
        self._drop_dead()
        with self._cond:
            rows = list(self._active)
        batch = self._batch
        if batch is not None:
            batch.keep_unfinished()
        if not rows:
            self._batch = None
            return
        known = {id(s) for s in batch.rows} if batch is not None else set()
        new = [s for s in rows if id(s) not in known]
        if new and batch is not None and batch.rows and self.one_pass:
            done = self._together(new, batch)
            if done is not None:
                self._batch = done
                return
        if new:
            batch = self._prefill(new, batch)
        self._batch = batch
        if batch is not None and batch.rows:
            self.largest_batch = max(self.largest_batch, len(batch.rows))
            if self.metrics is not None:
                self.metrics.batch(len(batch.rows))
            logits = isolate(batch.rows, lambda _rows: self._decode_undoable(batch),
                             lambda seq: self.passes.decode(batch.alone(seq)), self._row_failed, self._step_failed)
            if logits is not None:
                self._emit(batch.rows, logits)
            batch.keep_unfinished()

    def _prefill(self, new: list[Sequence], batch: KVBatch | None) -> KVBatch | None:
        """Prefill newcomers (their cached prefix blocks first): while other rows decode, at most
        ``prefill_chunk`` input tokens this step, so a long prompt takes several steps and the running
        rows get a token at each (vLLM's chunked prefill); from idle, all of them at once. A newcomer
        whose prefill fails alone fails alone (see isolation); rows whose input is done join ``batch``."""
        self.passes.reuse(new)
        decoding = batch is not None and bool(batch.rows)
        rows = take_chunks(new, self.prefill_chunk if decoding and self.prefill_chunk > 0 else None,
                           self.prefix_cache.block)
        prefilled = isolate(rows, self.passes.prefill, lambda seq: self.passes.prefill([seq], commit=False),
                            self._row_failed, self._step_failed)
        if prefilled is not None and prefilled[0] is not None:
            joined, logits = prefilled
            self._emit(joined.rows, logits)
            joined.keep_unfinished()
            batch = joined if batch is None or not batch.rows else batch.join(joined)
        return batch

    def _together(self, new: list[Sequence], batch: KVBatch) -> KVBatch | None:
        """The newcomers' prefill chunks and the running rows' next token in ONE forward pass
        (:mod:`one_pass`); the running batch with the newcomers whose input is done joined. None when
        that pass raised: it left nothing changed, and the step runs as two passes, whose isolation
        finds a row at fault."""
        self.passes.reuse(new)
        rows = take_chunks(new, self.prefill_chunk if self.prefill_chunk > 0 else None, self.prefix_cache.block)
        batch.keep_unfinished()
        if not batch.rows:
            return None
        lengths, mask = [layer.length for layer in batch.layers], batch.mask
        try:
            logits, joined, new_logits = one_pass.together(self.passes, batch, rows)
        except Exception:  # noqa: BLE001 -- the two passes run next, and report whose fault it was
            batch.rewind(lengths)
            batch.mask = mask
            log.debug("a step's one pass raised; running it as two passes", exc_info=True)
            return None
        self.largest_batch = max(self.largest_batch, len(batch.rows))
        if self.metrics is not None:
            self.metrics.batch(len(batch.rows))
        self._emit(batch.rows, logits)
        batch.keep_unfinished()
        if joined is None:
            return batch
        self._emit(joined.rows, new_logits)
        joined.keep_unfinished()
        return batch.join(joined) if batch.rows else joined

    def _decode_undoable(self, batch: "KVBatch") -> torch.Tensor:
        """A decode step of ``batch``'s unfinished rows that leaves its cache as it was when it raises."""
        batch.keep_unfinished()  # rows that failed alone since the last try
        lengths = [layer.length for layer in batch.layers]
        try:
            return self.passes.decode(batch)
        except BaseException:
            batch.rewind(lengths)
            raise

    def _emit(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Each row's next token; a row whose token, stop strings or text fail ends alone."""
        for seq, token in zip(rows, next_tokens(logits, [s.params for s in rows], [s.generator for s in rows])):
            if isinstance(token, Exception):
                self._row_failed(seq, token)
                continue
            try:
                self._advance(seq, token)
            except Exception as exc:  # noqa: BLE001 -- this row's own failure (stop strings, detokenization)
                self._row_failed(seq, exc)

    def _row_failed(self, seq: Sequence, exc: Exception) -> None:
        """``seq`` failed on its own: it ends with an error that says so; its batch goes on."""
        where = f"at token {len(seq.generated) + 1} with {seq.adapters_named()}"
        log.error("request %d failed alone %s; the rest of its batch goes on", seq.id, where, exc_info=exc)
        self._finish_error(seq, RowFailed(f"request {seq.id} failed {where}: {type(exc).__name__}: {exc}; the other "
                                          "requests in its batch were not affected (the server log has the details)"))

    def _exclusive_failed(self, seq: Sequence, exc: Exception) -> None:
        """An exclusive-path request failed alone. A domain error reaches its client as it is; any other
        is logged here once, with its traceback, and reaches the client as ``RowFailed`` (which its door
        logs without a second traceback)."""
        if isinstance(exc, AdapterHubError):
            self._finish_error(seq, exc)
            return
        log.error("exclusive-path request %d failed with %s", seq.id, seq.adapters_named(), exc_info=exc)
        self._finish_error(seq, RowFailed(f"request {seq.id} failed on the exclusive path with {seq.adapters_named()}: "
                                          f"{type(exc).__name__}: {exc}; other requests were not affected (the "
                                          "server log has the details)"))

    def _step_failed(self, rows: list[Sequence], exc: Exception) -> None:
        """A fault of the step itself (no row fails alone): its rows end, the log gets it once, and
        the engine serves the next step."""
        log.error("a batch step failed for %d request(s) (%s); serving the next step", len(rows),
                  ", ".join(str(seq.id) for seq in rows), exc_info=exc)
        for seq in rows:
            self._finish_error(seq, StepFailed(
                f"request {seq.id}: the batch step it was in failed ({type(exc).__name__}); the server logged it "
                "and serves the next step: retry"))

    def _advance(self, seq: Sequence, token: int) -> None:
        ended = seq.advance(token, self.eos_id, self.tokenizer)
        if ended is not None:
            self._complete(seq, token, *ended)

    def _complete(self, seq: Sequence, token: int, reason: str, text: str | None = None) -> None:
        last = seq.last_chunk(token, reason, text, self.tokenizer)
        self._finish(seq)
        self.completed += 1
        seq.put(last, last=True)

    def _finish(self, seq: Sequence) -> None:
        seq.finished = True
        if seq in self._active:
            with self._cond:
                self._active.remove(seq)
        self._release(seq)

    def _finish_error(self, seq: Sequence, error: BaseException | None) -> None:
        self._finish(seq)
        if error is not None:
            seq.put(error, last=True)

    def _release(self, seq: Sequence) -> None:
        for entry, _ in seq.entries:
            self.cache.release(entry)
        seq.entries = []

    def _run_slow(self, seq: Sequence) -> None:
        """Exclusive path for a method without a serving form: attach, generate alone, detach."""
        entry, _ = seq.entries[0]
        with self.packed.paused() if self.packed else contextlib.nullcontext():  # it writes the base's weights
            tokens = generate_alone(self.base, self.device, entry, seq, pad_id=self.pad_id, eos_id=self.eos_id,
                                    aborted=lambda: self._abort)
        if seq.cancelled:
            return self._finish_error(seq, None)
        if self._abort:
            self.ended += 1
            return self._finish_error(seq, _stopped(seq))
        if seq.deadline is not None and time.monotonic() > seq.deadline:
            return self._finish_error(seq, RequestTimeout(f"request {seq.id} passed its deadline on the slow path"))
        for token in tokens:
            if not seq.finished:
                self._advance(seq, token)

    # -- lifecycle --------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"pending": len(self._pending), "active": len(self._active)}

    def in_flight(self) -> tuple[list[Sequence], list[Sequence]]:
        """(running, waiting) sequences now, copied under the lock: what scrape-time gauges read, so
        they report the scheduler's own lists. Running counts an exclusive-path request too."""
        with self._cond:
            running = self._active + ([self._exclusive] if self._exclusive is not None else [])
            return [s for s in running if not s.finished], list(self._pending)

    def drain(self) -> None:
        """Take no new requests (``ShuttingDown``: UNAVAILABLE / 503, retry elsewhere); those in
        flight, queued ones included, go on."""
        with self._cond:
            if self._completed_at_drain is None:
                self._completed_at_drain = self.completed
            self._stopping = True
            self._cond.notify_all()

    def stop(self, grace: float = 5.0, *, hurry: Callable[[], bool] = lambda: False) -> tuple[int, int]:
        """Drain, give the requests in flight ``grace`` seconds to finish (less once ``hurry()`` says
        so), then end the rest with ``ShuttingDown`` between two steps. Returns how many of those in
        flight (finished, ended)."""
        self.drain()
        deadline = time.monotonic() + grace
        while self._thread.is_alive() and time.monotonic() < deadline and not hurry():
            self._thread.join(min(STOP_POLL_S, max(0.0, deadline - time.monotonic())))
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            self._thread.join(STEP_WAIT_S)  # the scheduler ends the rows at its next step boundary
        leftovers = self._end_all()  # none, unless the scheduler is stuck in a forward pass
        self.hooks.remove()
        if not self._thread.is_alive():  # the base is plain again for whoever uses it next
            for fast in (self.packed, self.norms):
                if fast is not None:
                    fast.remove()
        return self.completed - (self._completed_at_drain or 0), self.ended + leftovers

    def _end_all(self) -> int:
        """End every queued and running request (a stop's grace ran out); returns how many."""
        with self._cond:
            rows = list(self._pending) + list(self._active)
            self._pending.clear()
        for seq in rows:
            self._finish_error(seq, _stopped(seq))
        return len(rows)


SHUTTING_DOWN = "the server is shutting down and takes no new requests; retry in a moment (another replica answers)"
STOP_POLL_S = 0.05  # how often a stop looks at its hurry() while it waits
STEP_WAIT_S = 5.0  # how long a stop waits for the scheduler to reach a step boundary


def _stopped(seq: Sequence) -> ShuttingDown:
    return ShuttingDown(f"the server stopped before request {seq.id} finished ({len(seq.generated)} tokens generated; "
                        "its shutdown grace ran out); retry it")
