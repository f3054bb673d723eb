"""One request in flight: its prompt, adapters and generated tokens, and the events its caller reads.

The scheduler (:mod:`engine`) hands it each token; a sequence decides whether the token ends it
(EOS, a stop string, the length), turns tokens into text incrementally and hands its caller only
text that is final (no partial character, no possible start of a stop string).
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, Iterator

from .cache import LoadedAdapter
from .errors import RequestCancelled
from .prefix_cache import SOFT_TOKEN, adapter_set
from .requests import Chunk, GenerationRequest, GenerationResult, ResolvedAdapter
from .sampling import make_generator


class Sequence:
    """One request in flight: prompt, adapters, generated tokens and an event queue to its caller."""

    _ids = itertools.count(1)

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], entries: list[tuple[LoadedAdapter, float]],
                 resolved: list[ResolvedAdapter], deadline: float | None, stream: bool = True, events: Any = None):
        self.id = next(self._ids)
        self.request = request
        self.stream = stream  # False: the caller wants the result only (no per-token chunks)
        self.params = request.params
        self.prompt_ids = prompt_ids
        self.entries = entries
        self.resolved = resolved
        self.deadline = deadline
        self.generated: list[int] = []
        self.events: Any = events if events is not None else queue.Queue()  # anything with put(item)
        self.cancelled = False
        self.finished = False
        self.emitted_text = ""
        self.decoded = ""  # text of generated[:read_offset] (incremental detokenization)
        self.prefix_offset = 0
        self.read_offset = 0
        self.done = threading.Event()  # set with the last event: result() waits on it, not on every token
        self.generator = make_generator(self.params.seed) if self.params.temperature > 0 else None
        self.slow = any(entry.served is None for entry, _ in entries)
        self.prefix_len = 0  # key/value positions its prefix adapters take (set at prefill)
        # its prefill: the input is its soft prompts' virtual tokens, then its prompt; the keys/values
        # of input[:prefilled] are known (prefix cache hits, earlier chunks) and kept in input_kv
        # [layers, 2, kv_heads, prefilled, head_dim] until the last chunk, which ends at input_len
        self.soft_tokens = sum(entry.served.tokens for entry, _ in entries if entry.served is not None)
        self.input_len = self.soft_tokens + len(prompt_ids)
        self.prefilled = 0
        self.input_kv: Any = None
        self.prefill_end = self.input_len  # where this step's chunk of it ends (the scheduler sets it)
        self.looked_up = False  # the prefix cache was asked (once, before its first chunk)
        self.adapter_set = adapter_set(entries)  # what its cached blocks hang off

    def input_tokens(self) -> list[int]:
        """The prefill's input as the prefix cache chains it (virtual tokens as ``SOFT_TOKEN``)."""
        return [SOFT_TOKEN] * self.soft_tokens + self.prompt_ids

    def cancel(self) -> None:
        """Called by the RPC layer when the client goes away; the slot is freed at the next step."""
        if not self.finished:
            self.cancelled = True
            self.put(RequestCancelled(f"request {self.id} was cancelled by the client"), last=True)

    def put(self, item: Any, *, last: bool = False) -> None:
        self.events.put(item)
        if last:
            self.done.set()

    def chunks(self) -> Iterator[Chunk]:
        """Stream of chunks; the last has ``result``; raises the request's error if it failed."""
        while True:
            item = self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.result is not None:
                return

    def result(self) -> GenerationResult:
        """The final result (or the request's error). Waits once, not once per token, so a unary
        caller's thread does not wake up (and take the GIL from the scheduler) at every step."""
        self.done.wait()
        while True:
            item = self.events.get()
            if isinstance(item, BaseException):
                raise item
            if item.result is not None:
                return item.result

    def text(self, tokenizer: Any) -> str:
        """The generated text so far, decoding only the last few tokens each step (TGI's prefix /
        read offsets: decode with a little context, keep what follows it once it is complete)."""
        prefix = tokenizer.decode(self.generated[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = tokenizer.decode(self.generated[self.prefix_offset:], skip_special_tokens=True)
        new = full[len(prefix):] if full.startswith(prefix) else full
        if new and not new.endswith("\ufffd"):
            self.decoded += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.generated)
            return self.decoded
        return self.decoded + new

    def emit(self, token: int, text: str, hold: int) -> None:
        """Emit the text that is final: not a partial character, not a possible stop-string start."""
        safe = text[: len(text) - hold] if hold else text
        safe = safe.rstrip("\ufffd")
        if len(safe) > len(self.emitted_text) and safe.startswith(self.emitted_text):
            delta, self.emitted_text = safe[len(self.emitted_text):], safe
        else:
            delta = ""
        self.put(Chunk(delta, [token]))

    def advance(self, token: int, eos_id: int, tokenizer: Any) -> tuple[str, str | None] | None:
        """Append ``token``. When it ends the request: the finish reason, and the text a stop string
        cut (None: the whole text, decoded once at the end); else None, its final text streamed."""
        self.generated.append(token)
        params = self.params
        if token == eos_id:
            return "eos", None
        if not params.stop:
            if len(self.generated) >= params.max_new_tokens:
                return "length", None
            if self.stream:
                self.emit(token, self.text(tokenizer), hold=0)
            return None
        text = self.text(tokenizer)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            return "stop", text[:cut]
        if len(self.generated) >= params.max_new_tokens:
            return "length", None
        if self.stream:
            self.emit(token, text, hold=max(len(s) - 1 for s in params.stop))
        return None

    def last_chunk(self, token: int, reason: str, text: str | None, tokenizer: Any) -> Chunk:
        """The chunk that ends the request, with its result; the authoritative text is one full
        decode (a stop cut passes its text)."""
        if text is None:
            text = tokenizer.decode(self.generated, skip_special_tokens=True)
        delta = text[len(self.emitted_text):] if text.startswith(self.emitted_text) else ""
        result = GenerationResult(text=text, token_ids=list(self.generated), finish_reason=reason,
                                  adapters=self.resolved, prompt_tokens=len(self.prompt_ids),
                                  completion_tokens=len(self.generated))
        return Chunk(delta, [token] if self.stream else list(self.generated), result)

    def adapters_named(self) -> str:
        """Its adapters as an error message names them."""
        if not self.resolved:
            return "the base alone"
        return "adapters " + ", ".join(f"{a.resolved}:{a.weight:g}" for a in self.resolved)
