"""The model's side of a step: one forward pass with a batch's adapters applied per row, a prefill
of newcomers (their prefix adapters' keys/values and soft prompts in front, left-padded), and a
decode step of one token per row over the running rows' cache (:class:`KVBatch`).

The scheduler (:mod:`engine`) decides which rows run; this module only runs them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .batch_plan import BatchPlan, RowHooks
from .kv_batch import KVBatch
from .lora_backends import LoraBackend


class ForwardPasses:
    """Forward passes on ``model`` with adapters from ``pool``, LoRA by ``backend``."""

    def __init__(self, model: Any, pool: Any, backend: LoraBackend, *, pad_id: int):
        self.model, self.pool, self.backend, self.pad_id = model, pool, backend, pad_id
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers
        self.hooks = RowHooks(model)
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name goes through a
        # deprecation wrapper on every forward; 4.x knows only the old one)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill(self, rows: list[Any]) -> tuple[KVBatch, torch.Tensor]:
        """One forward pass over the newcomers' prompts (left-padded, after their prefixes)."""
        from transformers import DynamicCache  # transformers loads with the base, not with this module

        plan = BatchPlan([s.entries for s in rows], self.pool, self.device, backend=self.backend)
        # a row's input: its soft prompts' virtual tokens (if any), then its prompt; left-padded
        lengths = [soft + len(s.prompt_ids) for s, soft in zip(rows, plan.soft_lengths)]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (s, n) in enumerate(zip(rows, lengths)):
            ids[b, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[b, width - n:] = 1
            s.prefix_len = plan.prefix_lengths[b] + plan.soft_lengths[b]  # positions before its prompt
        positions = (mask.cumsum(-1) - 1).clamp_min(0) + torch.tensor(plan.prefix_lengths)[:, None]
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        inputs = self._soft_prompted(ids, plan.input_prefix(), lengths, width)
        layers, prefix_mask = plan.prefix_cache(self.num_layers, self.device)
        cache = DynamicCache(ddp_cache_data=layers) if layers is not None else DynamicCache()
        prefix_width = 0 if layers is None else prefix_mask.shape[1]
        if layers is not None:
            mask = torch.cat([prefix_mask, mask], dim=1)
        # a row's first attended column: its prefix's (right-aligned in the prefix block), else its prompt's
        starts = [prefix_width - p if p else prefix_width + width - n for n, p in zip(lengths, plan.prefix_lengths)]
        logits = self.forward(plan, inputs, mask, positions, cache)
        return KVBatch(rows, [(layer.keys, layer.values) for layer in cache.layers], mask, starts), logits

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

    def _soft_prompted(self, ids: torch.Tensor, soft: list | None, lengths: list[int], width: int) -> dict:
        """The forward's input: ``input_ids``, or where some row has soft prompts, ``inputs_embeds``
        with each row's virtual-token embeddings in front of its prompt's."""
        if soft is None:
            return {"input_ids": ids}
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(ids)
            for b, (prompt, n) in enumerate(zip(soft, lengths)):
                if prompt is not None:
                    embeds[b, width - n: width - n + prompt.shape[0]] = prompt.to(embeds.dtype)
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
