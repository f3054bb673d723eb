"""Prefix caching (issue 33): requests that share the start of their prompt reuse its keys/values,
per adapter set, and every adapter kind's tokens stay the ones it gets with the cache off.

Real engines on the tiny fp32 base over the mixed-world registry (LoRA, prefix, soft prompt,
bottleneck, IA3, compositions): the same mixed batch served with the cache disabled, cold and warm.
"""

from __future__ import annotations

import pytest
import torch

from adapterhub.serve.prefix_cache import PrefixCache

SYSTEM = "You are a terse assistant. Answer in one word, about sentiment only.\n"  # byte tokens: 4+ blocks of 16
TURNS = ["the good day", "a bad movie", "the food was fine", "dark cold room", "rain again", "so happy now",
         "meh", "the best show ever"]
ROWS = [  # one mixed batch: every servable kind, a composition, a weight, the base
    [("senti@1", 1.0)], [("pre@1", 1.0)], [("soft@1", 1.0)], [("bottle@1", 1.0)], [("scale@1", 1.0)],
    [("senti@1", 1.0), ("pre@1", 1.0)], [("senti@1", 0.5)], [],
]
MAX_NEW = 8


def _engine(registry, tiny_base_dir, **options):
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    return Engine.create(load_base(tiny_base_dir, "none"), AdapterSource(registry), capacity=8, max_batch=16, **options)


@pytest.fixture(scope="module")
def engines(mixed_world, tiny_base_dir):
    off = _engine(mixed_world["registry"], tiny_base_dir, prefix_cache_bytes=0, prefill_chunk=0)
    on = _engine(mixed_world["registry"], tiny_base_dir, prefix_cache_bytes=2**22)
    yield off, on
    off.stop(grace=1)
    on.stop(grace=1)


def _serve(engine, rows, turns) -> list[list[int]]:
    """One burst (admitted together, prefilled as one mixed batch): the tokens of each request."""
    from adapterhub.serve.requests import GenerationRequest

    seqs = [engine.submit(GenerationRequest.build(prompt=SYSTEM + turn, adapters=adapters, max_new_tokens=MAX_NEW),
                          stream=False) for adapters, turn in zip(rows, turns)]
    return [s.result().token_ids for s in seqs]


def test_every_kind_gets_the_same_tokens_cold_warm_and_disabled(engines):
    off, on = engines
    expected = _serve(off, ROWS, TURNS)
    assert off.prefix_cache.hit_tokens == 0 and len(off.prefix_cache) == 0
    hits = on.prefix_cache.hit_tokens
    assert _serve(on, ROWS, TURNS) == expected  # cold: every block computed here
    assert len(on.prefix_cache) > 0
    cold_hits = on.prefix_cache.hit_tokens - hits
    assert _serve(on, ROWS, TURNS) == expected  # warm: the same prompts, from the cache
    warm_hits = on.prefix_cache.hit_tokens - hits - cold_hits
    whole = len(SYSTEM) // 16 * 16
    assert warm_hits >= len(ROWS) * whole  # each row at least its system prompt's whole blocks
    # warm with other user turns: the shared system prompt still hits, the answers are still exact
    others = TURNS[3:] + TURNS[:3]
    before = on.prefix_cache.hit_tokens
    assert _serve(on, ROWS, others) == _serve(off, ROWS, others)
    assert on.prefix_cache.hit_tokens - before >= len(ROWS) * whole


def test_another_adapter_set_never_hits_a_cached_prefix(engines):
    off, on = engines
    _serve(on, [[("senti@1", 1.0)]], ["warm this prefix"])
    for adapters in ([("rev@1", 1.0)], [("senti@1", 0.25)], [("pre@1", 1.0), ("senti@1", 1.0)], [("ptune@1", 1.0)]):
        before = on.prefix_cache.hit_tokens
        assert _serve(on, [adapters], ["warm this prefix"]) == _serve(off, [adapters], ["warm this prefix"])
        assert on.prefix_cache.hit_tokens == before, adapters
        assert _serve(on, [adapters], ["warm this prefix"]) == _serve(off, [adapters], ["warm this prefix"])
        assert on.prefix_cache.hit_tokens > before, adapters  # its own set hits the second time


def _kv(fill: float, tokens: int = 16) -> torch.Tensor:
    return torch.full((2, 2, 1, tokens, 4), float(fill))


def test_blocks_chain_exactly_and_stay_under_the_budget_least_recently_used_first():
    block_bytes = _kv(0).numel() * 4
    cache = PrefixCache(3 * block_bytes)
    a, b = list(range(48)), list(range(32)) + [99] * 16
    cache.insert(("x",), a, torch.cat([_kv(1), _kv(2), _kv(3)], dim=3), 0)
    assert cache.bytes == 3 * block_bytes
    n, kv = cache.lookup(("x",), a, 47)
    assert n == 32 and kv[0, 0, 0, :, 0].tolist() == [1.0] * 16 + [2.0] * 16  # all but the last token: 2 blocks
    assert cache.lookup(("x",), b, 48)[0] == 32  # shares a's first two blocks; its third differs
    assert cache.lookup(("y",), a, 48) == (0, None)  # another adapter set
    assert cache.lookup(("x",), [5] + a[1:], 48) == (0, None)  # a different first token breaks the chain
    cache.insert(("x",), b, _kv(4), 32)  # b's third block: over budget, a's third block (the LRU tail) goes
    assert cache.bytes == 3 * block_bytes and len(cache) == 3
    assert cache.lookup(("x",), a, 48)[0] == 32
    n, kv = cache.lookup(("x",), b, 48)
    assert n == 48 and kv[0, 0, 0, 32:, 0].tolist() == [4.0] * 16
    cache.insert(("x",), list(range(100, 116)), _kv(5), 0)  # the tail of b's chain goes before its head
    assert cache.lookup(("x",), b, 48)[0] == 32
    off = PrefixCache(0)
    off.insert(("x",), a, torch.cat([_kv(1), _kv(2), _kv(3)], dim=3), 0)
    assert len(off) == 0 and off.lookup(("x",), a, 48) == (0, None)


def test_metrics_report_the_cache_in_vllm_names(engines):
    """``/metrics``' collector, through Prometheus' own exposition and parser, says what the cache did."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from adapterhub.serve.router_metrics import RouterMetrics

    off, on = engines

    def scrape(engine) -> dict:
        registry = CollectorRegistry()
        registry.register(RouterMetrics(engine, "tiny"))
        text = generate_latest(registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    _serve(on, [[]], ["count these tokens"])
    before = scrape(on)
    _serve(on, [[]], ["count these tokens"])  # the same prompt again: its whole blocks hit
    after = scrape(on)
    assert after["vllm:prefix_cache_hits_total"] == on.prefix_cache.hit_tokens
    assert after["vllm:prefix_cache_queries_total"] == on.prefix_cache.queried_tokens
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] >= len(SYSTEM) // 16 * 16
    assert after["adapterhub_prefix_cache_bytes"] == on.prefix_cache.bytes > 0
    quiet = scrape(off)  # the cache off: nothing looked up, nothing held
    assert quiet["vllm:prefix_cache_hits_total"] == quiet["vllm:prefix_cache_queries_total"] == 0
    assert quiet["adapterhub_prefix_cache_bytes"] == 0
