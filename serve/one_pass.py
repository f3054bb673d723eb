"""One forward pass for a step with newcomers: the running rows' next tokens and the newcomers'
prefill chunks together (vLLM's unified step), instead of a prefill pass and then a decode pass
that each read every weight.

The pass is a decode step with more rows: every newcomer token is a row of one token (its own
position, its request's adapters), after the running rows. Everything but attention works per
token already (projections, norms, the MLP, every adapter kind's hooks), so only attention needs to
know which rows belong together: :class:`Layout` keeps that, and the engine's attention function
(:mod:`attention`) asks it while a pass is active. The running rows attend over their cache as in a
decode step; each newcomer's tokens attend over what it has in front (prefix adapters' keys/values,
its input so far) and causally over its chunk, one ``sdpa`` per newcomer. The rows that need logits
(the running rows, and newcomers whose input ends here) are picked before the head.

Attention is the same per row as in the two passes; only the GEMMs see other row counts, so logits
agree to float rounding (``tests/test_one_pass.py`` checks tokens against the two passes for every
adapter kind). :class:`~.forward_pass.ForwardPasses` keeps the two passes for steps without running
rows, for probes, and as the fallback when this pass raises.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .batch_plan import BatchPlan
from .kv_batch import KVBatch

_active = threading.local()  # the Layout of the pass running on this thread (the scheduler's), if any


def active() -> "Layout | None":
    return getattr(_active, "layout", None)


class Layout:
    """Rows 0..R-1 decode over ``decode_mask`` ``[R, T+1]``; newcomer b has rows ``spans[b]`` and
    per layer the keys/values ``pasts[b][layer]`` ``[1, KV, P_b, D]`` in front (None: nothing)."""

    def __init__(self, decode_rows: int, decode_mask: torch.Tensor, spans: list[tuple[int, int]],
                 pasts: list[list[tuple[torch.Tensor, torch.Tensor]] | None], num_layers: int):
        self.decode_rows = decode_rows
        self.decode_mask = decode_mask.bool()[:, None, None, :]
        self.spans = spans
        self.pasts = pasts
        self.fresh: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers  # newcomers' rows, per layer

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               decode) -> torch.Tensor:
        """``[N, 1, H, D]`` for ``query [N, H, 1, D]``; ``key``/``value`` are the running rows' cache."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        r = self.decode_rows
        out = query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])
        out[:r] = decode(module, query[:r], key, value, self.decode_mask, scaling)
        fresh_k, fresh_v = self.fresh[module.layer_idx]
        for (start, n), past in zip(self.spans, self.pasts):
            q = query[start:start + n, :, 0].transpose(0, 1)[None]  # [1, H, n, D]
            k = fresh_k[start - r:start - r + n, :, 0].transpose(0, 1)[None]
            v = fresh_v[start - r:start - r + n, :, 0].transpose(0, 1)[None]
            front = 0
            if past is not None:
                pk, pv = past[module.layer_idx]
                front = pk.shape[2]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            mask = torch.ones(n, front + n, dtype=torch.bool, device=q.device).tril(front)[None, None]
            o, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=scaling)  # [1, n, H, D]
            out[start:start + n, 0] = o[0]
        return out


def _cache_class():
    from transformers import DynamicCache

    class SplitCache(DynamicCache):
        """The running rows' cache layers (written in place); newcomers' keys/values go to the layout."""

        def __init__(self, layers: list, layout: Layout):
            super().__init__()
            self.layers = layers
            self.layout = layout

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            r = self.layout.decode_rows
            self.layout.fresh[layer_idx] = (key_states[r:], value_states[r:])
            return self.layers[layer_idx].update(key_states[:r], value_states[:r])

    return SplitCache


def together(passes: Any, batch: KVBatch, rows: list[Any]) -> tuple[torch.Tensor, KVBatch | None, torch.Tensor]:
    """One pass: logits ``[R, V]`` of ``batch``'s rows (their cache grows by a token), and the
    newcomers' prefill of ``rows`` (each from ``prefilled`` to ``prefill_end``) as
    :meth:`ForwardPasses.prefill` returns it. Leaves no trace but the running rows' cache when it
    raises (the caller rewinds that)."""
    device, model = passes.device, passes.model
    r = len(batch.rows)
    row_plan = BatchPlan([s.entries for s in rows], passes.pool, device, backend=passes.backend)
    done, ends = [s.prefilled for s in rows], [s.prefill_end for s in rows]
    news = [e - d for e, d in zip(ends, done)]
    spans, start = [], r
    for n in news:
        spans.append((start, n))
        start += n
    total = start
    plan = BatchPlan([s.entries for s in batch.rows] + [s.entries for s, n in zip(rows, news) for _ in range(n)],
                     passes.pool, device, backend=passes.backend)
    ids = torch.full((total, 1), passes.pad_id, dtype=torch.long)
    positions = torch.empty((total, 1), dtype=torch.long)
    for i, s in enumerate(batch.rows):
        ids[i, 0] = s.generated[-1]
        positions[i, 0] = s.prefix_len + len(s.prompt_ids) + len(s.generated) - 1
    for b, (s, (first_row, n)) in enumerate(zip(rows, spans)):
        front = row_plan.prefix_lengths[b] + done[b]
        positions[first_row:first_row + n, 0] = torch.arange(front, front + n)
        first = max(done[b], s.soft_tokens)  # the chunk's first prompt token (virtual tokens come first)
        if ends[b] > first:
            ids[first_row + first - done[b]:first_row + n, 0] = torch.tensor(
                s.prompt_ids[first - s.soft_tokens:ends[b] - s.soft_tokens])
    ids, positions = ids.to(device), positions.to(device)
    inputs = _inputs(passes, ids, row_plan.input_prefix(), spans, done, ends)
    pasts = _pasts(passes, row_plan, rows, done)
    decode_mask = torch.cat([batch.mask, batch.mask.new_ones(r, 1)], dim=1)
    layout = Layout(r, decode_mask, spans, pasts, passes.num_layers)
    cache = _cache_class()(batch.layers, layout)
    finished = [b for b, s in enumerate(rows) if ends[b] == s.input_len]
    keep = list(range(r)) + [spans[b][0] + spans[b][1] - 1 for b in finished]
    logits = _forward(passes, plan, inputs, positions, cache, layout, keep)
    chunks = _chunks(layout, spans, r)  # per layer (k, v) [n_rows, KV, W, D], each chunk right-aligned
    width = max(news)
    joined = _joined(rows, finished, pasts, chunks, news, width, device) if finished else None
    # what the step keeps, last: anything above that raises leaves the rows as they were
    batch.mask = decode_mask
    for b, s in enumerate(rows):
        s.prefix_len = row_plan.prefix_lengths[b] + s.soft_tokens
    passes._keep(rows, done, ends, chunks, width)
    return logits[:r], joined, logits[r:]


def _forward(passes: Any, plan: BatchPlan, inputs: dict, positions: torch.Tensor, cache: Any, layout: Layout,
             keep: list[int]) -> torch.Tensor:
    """The model on ``[N, 1]`` rows with ``layout`` active; logits of the rows in ``keep``, the others
    dropped before the head (``model.get_decoder()``'s output is cut to them)."""
    index = torch.tensor(keep, dtype=torch.long, device=positions.device)

    def cut(_module, _args, output):
        output.last_hidden_state = output.last_hidden_state.index_select(0, index)
        return output

    handle = passes.model.get_decoder().register_forward_hook(cut)
    _active.layout = layout
    try:
        return passes.forward(plan, inputs, None, positions, cache)
    finally:
        _active.layout = None
        handle.remove()


def _inputs(passes: Any, ids: torch.Tensor, soft: list | None, spans: list, done: list[int], ends: list[int]) -> dict:
    """``input_ids``, or where a newcomer has soft prompts, ``inputs_embeds`` with its virtual tokens'
    embeddings on their rows."""
    if soft is None:
        return {"input_ids": ids}
    with torch.inference_mode():
        embeds = passes.model.get_input_embeddings()(ids)
        for b, prompt in enumerate(soft):
            if prompt is not None and done[b] < prompt.shape[0]:
                last = min(ends[b], prompt.shape[0])
                row = spans[b][0]
                embeds[row:row + last - done[b], 0] = prompt[done[b]:last].to(embeds.dtype)
    return {"inputs_embeds": embeds}


def _pasts(passes: Any, plan: BatchPlan, rows: list[Any], done: list[int]) -> list:
    """Per newcomer, per layer the keys/values in front of its chunk ``[1, KV, P_b, D]`` (None: none)."""
    layers, _ = passes._past(plan, rows, done)
    pasts = []
    for b, (p, d) in enumerate(zip(plan.prefix_lengths, done)):
        if layers is None or p + d == 0:
            pasts.append(None)
            continue
        width = layers[0][0].shape[2]
        pasts.append([(k[b:b + 1, :, width - p - d:], v[b:b + 1, :, width - p - d:]) for k, v in layers])
    return pasts


def _chunks(layout: Layout, spans: list, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the newcomers' chunk keys/values ``[n_rows, KV, W, D]``, each right-aligned."""
    width = max(n for _, n in spans)
    out = []
    for k, v in layout.fresh:
        kv = []
        for t in (k, v):
            padded = t.new_zeros(len(spans), t.shape[1], width, t.shape[3])
            for b, (start, n) in enumerate(spans):
                padded[b, :, width - n:] = t[start - r:start - r + n, :, 0].transpose(0, 1)
            kv.append(padded)
        out.append((kv[0], kv[1]))
    return out


def _joined(rows: list[Any], finished: list[int], pasts: list, chunks: list, news: list[int], width: int,
            device: Any) -> KVBatch:
    """The newcomers whose input ended here, as a :class:`KVBatch`: each row's keys/values in front and
    its chunk, left-padded to one width."""
    lengths = [(0 if pasts[b] is None else pasts[b][0][0].shape[2]) + news[b] for b in finished]
    full = max(lengths)
    layers = []
    for layer, (ck, cv) in enumerate(chunks):
        kv = []
        for which, chunk in enumerate((ck, cv)):
            out = chunk.new_zeros(len(finished), chunk.shape[1], full, chunk.shape[3])
            for i, b in enumerate(finished):
                parts = [chunk[b:b + 1, :, width - news[b]:]]
                if pasts[b] is not None:
                    parts.insert(0, pasts[b][layer][which])
                out[i:i + 1, :, full - lengths[i]:] = torch.cat(parts, dim=2)
            kv.append(out)
        layers.append((kv[0], kv[1]))
    mask = torch.zeros(len(finished), full, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, full - n:] = 1
    return KVBatch([rows[b] for b in finished], layers, mask, [full - n for n in lengths])
