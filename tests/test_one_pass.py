"""One pass per step (issue 33): newcomers' prefill chunks and the running rows' next token in one
forward pass (``serve/one_pass.py``) give every adapter kind the tokens of the two passes.

Real engines on the tiny fp32 base over the mixed-world registry, one with the one pass and one
without: a row is decoding when prompts with LoRA, prefix, soft prompt, bottleneck, IA3, BitFit and
DoRA adapters, a composition and the base arrive; whole and in chunks, with the prefix cache cold
and warm. A failing pass falls back to the two passes, whose isolation fails the bad row alone.
"""

from __future__ import annotations

import pytest

from adapterhub.serve import one_pass

LONG = "a long winding story about a rainy day and a good movie, " * 2
ROWS = [[("senti@1", 1.0)], [("pre@1", 1.0)], [("soft@1", 1.0)], [("bottle@1", 1.0)], [("scale@1", 1.0)],
        [("bias@1", 1.0)], [("dora@1", 1.0)], [("senti@1", 0.5), ("pre@1", 1.0), ("bottle@1", 1.0)], []]
MAX_NEW = 6


@pytest.fixture(scope="module")
def make(mixed_world, tiny_base_dir):
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    made = []

    def make(**options):
        engine = Engine.create(load_base(tiny_base_dir, "none"), AdapterSource(mixed_world["registry"]), capacity=8,
                               max_batch=16, **options)
        engine.eos_id = -1  # the random base may say EOS at any step: every row makes all its tokens
        for adapters in ROWS:  # adapters loaded first
            engine.submit(_request("warm", adapters, max_new=1)).result()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.stop(grace=1)


@pytest.fixture
def counted(monkeypatch):
    """The steps that ran as one pass (not those whose one pass raised and ran as two), and the
    newcomer rows in each."""
    calls = []
    real = one_pass.together

    def together(passes, batch, rows):
        out = real(passes, batch, rows)
        calls.append(len(rows))
        return out

    monkeypatch.setattr(one_pass, "together", together)
    return calls


def _request(prompt, adapters=(), max_new=MAX_NEW):
    from adapterhub.serve.requests import GenerationRequest

    return GenerationRequest.build(prompt=prompt, adapters=list(adapters), max_new_tokens=max_new)


def _arrive_while_decoding(engine, tag: str) -> list[list[int]]:
    """A request is decoding when the others arrive, one by one; their tokens, and the running one's."""
    running = engine.submit(_request("hi", max_new=60))
    stream = running.chunks()
    while len(running.generated) < 2:
        next(stream)
    seqs = [engine.submit(_request(f"{LONG} {tag} #{i}", adapters), stream=False) for i, adapters in enumerate(ROWS)]
    tokens = [s.result().token_ids for s in seqs]
    return tokens + [running.result().token_ids]


@pytest.mark.parametrize("chunk", [0, 16])
def test_one_pass_gives_every_kind_the_tokens_of_two_passes(make, counted, chunk):
    two = make(prefix_cache_bytes=0, prefill_chunk=chunk, one_pass_steps=False)
    one = make(prefix_cache_bytes=0, prefill_chunk=chunk)
    expected = _arrive_while_decoding(two, "x")
    assert not counted, "the two-pass engine ran a step as one pass"
    assert _arrive_while_decoding(one, "x") == expected
    assert sum(counted) >= len(ROWS), "not every newcomer was prefilled in a step's one pass"


def test_one_pass_reuses_and_fills_the_prefix_cache_with_the_same_tokens(make, counted):
    two = make(prefix_cache_bytes=2**24, prefill_chunk=16, one_pass_steps=False)
    one = make(prefix_cache_bytes=2**24, prefill_chunk=16)
    for tag in ("cold", "cold"):  # the second round finds the first's blocks
        assert _arrive_while_decoding(one, tag) == _arrive_while_decoding(two, tag)
    assert counted and one.prefix_cache.hit_tokens > 0


def test_a_row_that_breaks_the_one_pass_fails_alone(make, monkeypatch):
    """A newcomer whose adapter hook raises: the one pass raises, the step runs as two passes, and
    isolation ends that row alone while the running row and the other newcomers keep their tokens."""
    from adapterhub.serve.kinds.bottleneck import BottleneckPart

    engine = make(prefix_cache_bytes=0, one_pass_steps=True)
    expected = _arrive_while_decoding(make(prefix_cache_bytes=0, one_pass_steps=False), "y")
    def after(self, module, x, out):  # in the batch and alone: this adapter is broken now
        raise RuntimeError("poisoned bottleneck")

    monkeypatch.setattr(BottleneckPart, "after", after)
    running = engine.submit(_request("hi", max_new=60))
    stream = running.chunks()
    while len(running.generated) < 2:
        next(stream)
    seqs = [engine.submit(_request(f"{LONG} y #{i}", adapters), stream=False) for i, adapters in enumerate(ROWS)]
    for i, (seq, adapters) in enumerate(zip(seqs, ROWS)):
        if any(ref == "bottle@1" for ref, _ in adapters):
            with pytest.raises(Exception, match="poisoned bottleneck"):
                seq.result()
        else:
            assert seq.result().token_ids == expected[i]
    assert running.result().token_ids == expected[-1]
