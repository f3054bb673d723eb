"""The model's side of a step: one forward pass with a batch's adapters applied per row, a prefill
of newcomers (their prefix adapters' keys/values and soft prompts in front, left-padded), and a
decode step of one token per row over the running rows' cache (:class:`KVBatch`).

A prefill pass computes a CHUNK of each row's input: from what the row already has (the prefix
cache's blocks, :mod:`prefix_cache`; its earlier chunks) to the end the scheduler chose. Both are
the same case: known keys/values in front, right-aligned, the chunk behind them, so a long prompt
split over several steps and a prompt whose system prompt was cached take one code path.

Newcomers are left-padded, not packed into one unpadded sequence: transformers' attention has no
variable-length form on the CPU, and a packed sequence of L tokens would need a block-diagonal
``[L, L]`` mask (32 prompts of 100 tokens: 32x the attention work of the padded batch). With
chunking, a step's padding is bounded by ``--prefill-chunk``.

The scheduler (:mod:`engine`) decides which rows run; this module only runs them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .batch_plan import BatchPlan, RowHooks
from .kv_batch import KVBatch
from .lora_backends import LoraBackend
from .prefix_cache import PrefixCache


class ForwardPasses:
    """Forward passes on ``model`` with adapters from ``pool``, LoRA by ``backend``."""

    def __init__(self, model: Any, pool: Any, backend: LoraBackend, *, pad_id: int,
                 prefix_cache: PrefixCache | None = None):
        self.model, self.pool, self.backend, self.pad_id = model, pool, backend, pad_id
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.budget > 0 else None
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers
        self.hooks = RowHooks(model)
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name goes through a
        # deprecation wrapper on every forward; 4.x knows only the old one)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def reuse(self, rows: list[Any]) -> None:
        """Rows about to start their prefill take what the prefix cache holds of their input (at most
        all but its last token: the prefill must compute a row's logits)."""
        cache = self.prefix_cache
        for s in rows:
            if s.looked_up:
                continue
            s.looked_up = True
            if cache is not None and s.prefilled == 0:
                s.prefilled, s.input_kv = cache.lookup(s.adapter_set, s.input_tokens(), s.input_len - 1)

    def prefill(self, rows: list[Any], *, commit: bool = True) -> tuple[KVBatch | None, torch.Tensor]:
        """One forward pass over each row's input from ``prefilled`` to ``prefill_end`` (left-padded),
        behind what the row already has in front: its prefix adapters' keys/values and those of its
        input so far (right-aligned). Rows whose input ends here come back as a :class:`KVBatch`
        (None: none does) with their logits; the others keep their keys/values for their next chunk.
        ``commit`` False (a probe) keeps nothing."""
        from transformers import DynamicCache  # transformers loads with the base, not with this module

        plan = BatchPlan([s.entries for s in rows], self.pool, self.device, backend=self.backend)
        done, ends = [s.prefilled for s in rows], [s.prefill_end for s in rows]
        news = [e - d for e, d in zip(ends, done)]
        width = max(news)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, s in enumerate(rows):
            first = max(done[b], s.soft_tokens)  # the chunk's first prompt token (virtual tokens come first)
            if ends[b] > first:
                ids[b, width - (ends[b] - first):] = torch.tensor(s.prompt_ids[first - s.soft_tokens:ends[b] - s.soft_tokens])
            mask[b, width - news[b]:] = 1
            s.prefix_len = plan.prefix_lengths[b] + s.soft_tokens  # positions before its prompt
        offsets = torch.tensor([p + d for p, d in zip(plan.prefix_lengths, done)])
        positions = (mask.cumsum(-1) - 1).clamp_min(0) + offsets[:, None]
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        inputs = self._soft_prompted(ids, plan.input_prefix(), done, ends, width)
        layers, past_mask = self._past(plan, rows, done)
        cache = DynamicCache(ddp_cache_data=layers) if layers is not None else DynamicCache()
        past = 0 if layers is None else past_mask.shape[1]
        if layers is not None:
            mask = torch.cat([past_mask, mask], dim=1)
        # a row's first attended column: what it has in front (right-aligned in the past block), else its chunk's
        starts = [past - (p + d) if p + d else past + width - n for n, p, d in zip(news, plan.prefix_lengths, done)]
        logits = self.forward(plan, inputs, mask, positions, cache)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if commit:
            self._keep(rows, done, ends, kv, past + width)
        finished = [b for b, s in enumerate(rows) if ends[b] == s.input_len]
        if not finished:
            return None, logits[:0]
        if len(finished) < len(rows):  # the rows still in their prefill stay out of the batch
            index = torch.tensor(finished, dtype=torch.long, device=mask.device)
            first = min(starts[b] for b in finished)
            kv = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:]) for k, v in kv]
            mask, logits = mask.index_select(0, index)[:, first:], logits.index_select(0, index)
            starts = [starts[b] - first for b in finished]
        return KVBatch([rows[b] for b in finished], kv, mask, starts), logits

    def _past(self, plan: BatchPlan, rows: list[Any], done: list[int]) -> tuple[list | None, torch.Tensor | None]:
        """Per layer (keys, values) ``[B, kv_heads, P, head_dim]`` in front of the rows' chunks: each
        row's prefix adapters', then its input's so far, right-aligned; and their mask ``[B, P]``."""
        layers, prefix_mask = plan.prefix_cache(self.num_layers, self.device)
        if not any(done):
            return layers, prefix_mask  # prefixes alone (or nothing): already in that layout
        lengths = plan.prefix_lengths
        width = max(p + d for p, d in zip(lengths, done))
        sample = next(s.input_kv for s in rows if s.input_kv is not None)  # [layers, 2, kv_heads, n, head_dim]
        n_layers, _, heads, _, dim = sample.shape
        kv = sample.new_zeros(n_layers, 2, len(rows), heads, width, dim)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        prefixes = torch.stack([torch.stack(pair) for pair in layers]) if layers is not None else None
        for b, (s, p, d) in enumerate(zip(rows, lengths, done)):
            if d:
                kv[:, :, b, :, width - d:] = s.input_kv
            if p:
                kv[:, :, b, :, width - d - p:width - d] = prefixes[:, :, b, :, prefixes.shape[4] - p:]
            mask[b, width - d - p:] = 1
        return [(kv[layer, 0], kv[layer, 1]) for layer in range(n_layers)], mask

    def _keep(self, rows: list[Any], done: list[int], ends: list[int], kv: list, width: int) -> None:
        """After a prefill pass: rows in mid-prefill keep their input's keys/values for the next chunk,
        and the prefix cache keeps the whole blocks this pass computed."""
        cache = self.prefix_cache
        for b, s in enumerate(rows):
            partial = ends[b] < s.input_len
            blocks = cache is not None and ends[b] // cache.block > done[b] // cache.block
            if partial or blocks:
                col = width - (ends[b] - done[b])
                fresh = torch.stack([torch.stack((k[b, :, col:width], v[b, :, col:width])) for k, v in kv])
                if blocks:
                    cache.insert(s.adapter_set, s.input_tokens(), fresh, done[b])
                if partial:
                    s.input_kv = fresh if s.input_kv is None else torch.cat([s.input_kv, fresh], dim=3)
            if not partial:
                s.input_kv = None
            s.prefilled = ends[b]

    def decode(self, batch: KVBatch) -> torch.Tensor:
        """One token per row (its latest), attending to the cached keys/values."""
        rows = batch.rows
        plan = BatchPlan([s.entries for s in rows], self.pool, self.device, backend=self.backend)
        ids = torch.tensor([[s.generated[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[s.prefix_len + len(s.prompt_ids) + len(s.generated) - 1] for s in rows],
                                 device=self.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        logits = self.forward(plan, ids, mask, positions, batch.cache())
        batch.mask = mask
        return logits

    def _soft_prompted(self, ids: torch.Tensor, soft: list | None, done: list[int], ends: list[int],
                       width: int) -> dict:
        """The forward's input: ``input_ids``, or where some row has soft prompts, ``inputs_embeds``
        with the row's virtual-token embeddings that fall in its chunk in front of its prompt's."""
        if soft is None:
            return {"input_ids": ids}
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(ids)
            for b, prompt in enumerate(soft):
                if prompt is not None and done[b] < prompt.shape[0]:
                    col, last = width - (ends[b] - done[b]), min(ends[b], prompt.shape[0])
                    embeds[b, col:col + last - done[b]] = prompt[done[b]:last].to(embeds.dtype)
        return {"inputs_embeds": embeds}

    def forward(self, plan: BatchPlan, inputs: Any, mask, positions, cache) -> torch.Tensor:
        """One forward pass with ``plan``'s adapters; ``inputs`` is ``input_ids`` (a tensor) or a dict
        naming the model's input (``inputs_embeds`` for soft prompts)."""
        inputs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
        self.hooks.ensure(plan.modules, plan.input_modules)
        self.hooks.plan = plan
        try:
            with torch.inference_mode():
                out = self.model(**inputs, attention_mask=mask, position_ids=positions, **{self.cache_kwarg: cache},
                                 use_cache=True, logits_to_keep=1)
        finally:
            self.hooks.plan = None
            plan.drain()
        return out.logits[:, -1, :].float()


def take_chunks(rows: list[Any], budget: int | None, block: int) -> list[Any]:
    """The rows a prefill pass runs and where each one's chunk ends (``prefill_end``): in arrival
    order, whole inputs while they fit ``budget`` input tokens (None: no limit), then a part of the
    next one, cut at a multiple of ``block`` (so the prefix cache keeps each chunk's whole blocks).
    At least one row always moves, by at least one block."""
    taken: list[Any] = []
    for s in rows:
        left = s.input_len - s.prefilled
        if budget is None or left <= budget:
            s.prefill_end = s.input_len
            taken.append(s)
            budget = None if budget is None else budget - left
            continue
        n = budget // block * block
        if n == 0 and not taken:
            n = min(left, block)
        if n:
            s.prefill_end = s.prefilled + n
            taken.append(s)
        break
    return taken
