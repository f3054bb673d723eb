"""Chunked prefill (issue 33): a long prompt arriving while others generate is prefilled a chunk per
step, the running rows getting a token at each step, and every adapter kind's tokens stay exact.

Real engines on the tiny fp32 base over the mixed-world registry: long prompts with LoRA, prefix,
soft prompt, bottleneck and IA3 adapters (and a composition) arrive while a row is decoding; their
tokens must equal those of an engine that prefills whole prompts, and the running row must move on
while they are prefilled.
"""

from __future__ import annotations

import pytest

LONG = "a long winding story about a rainy day and a good movie, " * 3  # ~170 byte tokens: 11 chunks of 16
ROWS = [[("senti@1", 1.0)], [("pre@1", 1.0)], [("soft@1", 1.0)], [("bottle@1", 1.0)], [("scale@1", 1.0)],
        [("senti@1", 1.0), ("pre@1", 1.0)], []]
MAX_NEW = 6
CHUNK = 16


@pytest.fixture(scope="module")
def engines(mixed_world, tiny_base_dir):
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    def make(**options):
        return Engine.create(load_base(tiny_base_dir, "none"), AdapterSource(mixed_world["registry"]), capacity=8,
                             max_batch=16, prefix_cache_bytes=0, **options)

    whole, chunked = make(prefill_chunk=0), make(prefill_chunk=CHUNK)
    for engine in (whole, chunked):
        engine.eos_id = -1  # the random base may say EOS at any step: every row makes all its tokens
    yield whole, chunked
    whole.stop(grace=1)
    chunked.stop(grace=1)


def _request(prompt, adapters=(), max_new=MAX_NEW):
    from adapterhub.serve.requests import GenerationRequest

    return GenerationRequest.build(prompt=prompt, adapters=list(adapters), max_new_tokens=max_new)


def _arrive_while_decoding(engine) -> tuple[list[list[int]], int, int]:
    """A short request starts decoding; the long ones arrive together. Returns the long ones' tokens,
    and how many tokens the running request had when they arrived and when the first of them got its
    first token (the steps its prefill took)."""
    for adapters in ROWS:  # the adapters loaded first: a load must not pass for prefill steps
        engine.submit(_request("warm", adapters, max_new=1)).result()
    running = engine.submit(_request("hi", max_new=400))
    stream = running.chunks()
    next(stream)
    while len(running.generated) < 3:
        next(stream)
    at_arrival = len(running.generated)
    seqs = [engine.submit(_request(f"{LONG} #{i}", adapters), stream=False) for i, adapters in enumerate(ROWS)]
    while not seqs[0].generated:
        next(stream)
    at_first_token = len(running.generated)
    tokens = [s.result().token_ids for s in seqs]
    running.cancel()
    return tokens, at_arrival, at_first_token


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps_with_the_same_tokens(engines):
    whole, chunked = engines
    expected, arrival, first = _arrive_while_decoding(whole)
    assert first - arrival <= 3  # whole prompts: one prefill step (the running row waits for it)
    tokens, arrival, first = _arrive_while_decoding(chunked)
    assert tokens == expected
    # the first long prompt alone is 10+ chunks of 16: the running row got a token at each of those steps
    assert first - arrival >= len(LONG) // CHUNK - 1


def test_an_idle_engine_prefills_a_burst_whole(engines):
    """With no row decoding there is nothing to protect: the chunk limit does not apply."""
    _, chunked = engines
    seqs = [chunked.submit(_request(f"{LONG} #{i}", adapters), stream=False) for i, adapters in enumerate(ROWS[:3])]
    for s in seqs:
        s.result()
    assert all(s.prefilled == s.input_len and s.input_kv is None for s in seqs)
