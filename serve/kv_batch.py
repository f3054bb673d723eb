"""The running rows' key/value cache: buffers with spare columns, rows joining and leaving.

Kept apart from the scheduler (:mod:`engine`), which only asks it to join newcomers, drop finished
rows, copy one row out for a probe (:mod:`isolation`) and rewind a step that raised.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

SPARE = 64  # columns a layer's buffer keeps for the next steps' tokens before it grows


@functools.cache
def _slab_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A cache layer whose keys/values sit in a buffer with spare columns: a decode step writes
        its token in place (``DynamicLayer`` concatenates, copying the whole cache every step)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE):
            super().__init__()
            self._fill([(keys, values)], keys.shape[2], spare)

        @classmethod
        def stacked(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> SlabLayer:
            """The rows of ``parts`` one under another, each right-aligned in ``width`` columns with
            zeros in front: one copy into the new buffer (padding first and concatenating, then
            copying into a slab, moved every key and value twice)."""
            layer = cls.__new__(cls)
            super(SlabLayer, layer).__init__()
            layer._fill(parts, width, SPARE)
            return layer

        def _fill(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int, spare: int) -> None:
            # spare columns are never read before a step writes them (the views stop at length):
            # no need to zero-fill megabytes per prefill; padding in front is read (masked), so zeros
            k0 = parts[0][0]
            self.length = width
            self._k = k0.new_empty(sum(k.shape[0] for k, _ in parts), k0.shape[1], width + spare, k0.shape[3])
            self._v = torch.empty_like(self._k)
            row = 0
            for keys, values in parts:
                n, pad = keys.shape[0], width - keys.shape[2]
                for buf, src in ((self._k, keys), (self._v, values)):
                    buf[row:row + n, :, :pad].zero_()
                    buf[row:row + n, :, pad:width] = src
                row += n
            self.device, self.is_initialized = k0.device, True
            self._views()

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[2]
            if self.length + n > self._k.shape[2]:
                grown = SlabLayer(self.keys, self.values, spare=self.length + n)
                self._k, self._v = grown._k, grown._v
            self._k[:, :, self.length: self.length + n] = key_states
            self._v[:, :, self.length: self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

    return SlabLayer


class KVBatch:
    """The running rows' key/value cache: per layer ``[B, kv_heads, T, head_dim]`` (left-padded, in
    buffers with spare columns) and the attention mask ``[B, T]`` (0 = padding).

    Rows join after their prefill (both caches left-padded to one width and concatenated) and leave
    by ``index_select``; columns that no remaining row attends to are trimmed from the left.
    """

    def __init__(self, rows: list[Any], layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                 starts: list[int]):
        slab = _slab_layer_class()
        self.rows = rows
        self.layers = [slab(k, v) for k, v in layers]
        self.mask = mask
        self.starts = starts  # per row, its first column the mask attends (on the host: trimming reads no device)

    def cache(self) -> Any:
        """A ``DynamicCache`` over these layers: the model's forward appends to them in place."""
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.layers = self.layers
        return cache

    def join(self, other: "KVBatch") -> "KVBatch":
        width = max(self.mask.shape[1], other.mask.shape[1])
        slab = _slab_layer_class()
        mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        starts = [s + width - self.mask.shape[1] for s in self.starts] + [s + width - other.mask.shape[1] for s in other.starts]
        joined = KVBatch(self.rows + other.rows, [], mask, starts)
        joined.layers = [slab.stacked([(a.keys, a.values), (b.keys, b.values)], width)
                         for a, b in zip(self.layers, other.layers)]
        return joined

    def alone(self, seq: Any) -> "KVBatch":
        """``seq``'s row by itself, on copies: a probe's forward must not write the running cache."""
        i = next(i for i, s in enumerate(self.rows) if s is seq)
        start = self.starts[i]
        return KVBatch([seq], [(layer.keys[i:i + 1, :, start:], layer.values[i:i + 1, :, start:]) for layer in self.layers],
                       self.mask[i:i + 1, start:], [0])

    def rewind(self, lengths: list[int]) -> None:
        """Back to per-layer ``lengths`` after a forward that raised: a layer's length is all a step
        moves (the columns it wrote are never read before a later step writes them again)."""
        for layer, length in zip(self.layers, lengths):
            layer.length = length
            layer._views()

    def keep_unfinished(self) -> None:
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = min((self.starts[i] for i in keep), default=mask.shape[1])
        slab = _slab_layer_class()
        self.rows = [self.rows[i] for i in keep]
        self.starts = [self.starts[i] - start for i in keep]
        self.mask = mask[:, start:]
        self.layers = [slab(layer.keys[:, :, start:].index_select(0, index), layer.values[:, :, start:].index_select(0, index))
                       for layer in self.layers]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
