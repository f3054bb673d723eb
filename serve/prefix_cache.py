"""Prompt keys/values kept across requests, block by block (vLLM's automatic prefix caching).

Requests that share the start of their input (a system prompt, the chat template's header) share
the keys/values of those tokens, provided they run with the same adapters at the same weights: a
LoRA or IA3 changes every key, a prefix adapter's own keys/values sit in front and a soft prompt's
virtual tokens take the first positions. So each chain of blocks hangs off the request's adapter
set (:func:`adapter_set`), and a different set never meets another's blocks.

A block is ``BLOCK`` input tokens; its key is ``(its parent block's id, its tokens)`` (the root's
parent is the adapter set), a hashed chain like vLLM's, but compared exactly by the dict, so a
hash collision can never hand a row someone else's keys. A block's id is unique for the life of
the cache, so a block whose parent was evicted is unreachable, never wrong, and ages out.
Memory is bounded by a byte budget; the least recently used block goes first, and a chain is
touched leaf first, so a chain loses its tail before its shared head.

Used by the scheduler thread only (no lock).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Sequence

import torch

BLOCK = 16  # tokens per block: a shared system prompt hits up to the last whole block before the user turn
SOFT_TOKEN = -1  # stands for a soft prompt's virtual token in a chain (the adapter set says which embedding)


def adapter_set(entries: Sequence[tuple[Any, float]]) -> tuple:
    """What a cached block is valid for: each adapter's immutable version, its files' digests and
    its weight, in request order (prefixes and soft prompts concatenate in that order)."""
    return tuple((e.key, _digests(e), float(w)) for e, w in entries)


def _digests(entry: Any) -> tuple:
    manifest = getattr(getattr(entry, "version", None), "manifest", None)
    files = getattr(manifest, "files", None) or {}
    return tuple(sorted((name, f.sha256) for name, f in files.items()))


@dataclasses.dataclass(eq=False)
class _Block:
    id: int
    key: tuple
    kv: torch.Tensor  # [layers, 2, kv_heads, BLOCK, head_dim]


class PrefixCache:
    """Blocks of prompt keys/values by adapter set and token chain, LRU under ``budget`` bytes."""

    def __init__(self, budget: int, block: int = BLOCK):
        if budget < 0:
            raise ValueError(f"prefix cache budget {budget} bytes: use 0 (off) or more")
        self.budget, self.block = budget, block
        self.bytes = 0
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self.hit_tokens = 0  # input tokens whose keys/values came from here (metrics, benches, tests)
        self.queried_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, root: tuple, tokens: Sequence[int], blocks: int) -> list[_Block]:
        """The cached blocks along ``tokens``' first ``blocks`` whole blocks, up to the first missing one."""
        found, parent = [], root
        for i in range(blocks):
            hit = self._blocks.get((parent, tuple(tokens[i * self.block:(i + 1) * self.block])))
            if hit is None:
                break
            found.append(hit)
            parent = hit.id
        return found

    def _touch(self, chain: list[_Block]) -> None:
        for hit in reversed(chain):  # the head ends up most recent: the tail is evicted first
            self._blocks.move_to_end(hit.key)

    def lookup(self, root: tuple, tokens: Sequence[int], limit: int) -> tuple[int, torch.Tensor | None]:
        """``(n, kv)``: the keys/values ``[layers, 2, kv_heads, n, head_dim]`` of ``tokens[:n]``,
        ``n`` the most whole cached blocks within ``limit`` tokens (0 and None: a miss)."""
        self.queried_tokens += len(tokens)
        chain = self._chain(root, tokens, max(0, limit) // self.block)
        if not chain:
            return 0, None
        self._touch(chain)
        n = len(chain) * self.block
        self.hit_tokens += n
        return n, torch.cat([b.kv for b in chain], dim=3)

    def insert(self, root: tuple, tokens: Sequence[int], kv: torch.Tensor, offset: int) -> None:
        """Keep the whole blocks of ``tokens`` that ``kv`` (keys/values of ``tokens[offset:offset +
        kv.shape[3]]``) covers; blocks before ``offset`` must be cached already for the chain to go on."""
        if self.budget <= 0:
            return
        end = offset + kv.shape[3]
        chain = self._chain(root, tokens, end // self.block)
        parent = chain[-1].id if chain else root
        for i in range(len(chain), end // self.block):
            start = i * self.block
            if start < offset:  # this block's start was computed before kv: the chain stops here
                break
            piece = kv[:, :, :, start - offset:start - offset + self.block].clone()
            size = piece.numel() * piece.element_size()
            if size > self.budget:
                break
            block = _Block(next(self._ids), (parent, tuple(tokens[start:start + self.block])), piece)
            self._blocks[block.key] = block
            self.bytes += size
            chain.append(block)
            parent = block.id
        self._touch(chain)
        while self.bytes > self.budget:  # least recently used first: this chain's tail before its head
            _, old = self._blocks.popitem(last=False)
            self.bytes -= old.kv.numel() * old.kv.element_size()
