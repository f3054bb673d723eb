"""Decode-step attention (serve/attention.py, the C kernel in serve/_bgmv.c): equal to transformers'
sdpa on what it takes, sdpa itself on everything else, and installed on the engine's model only."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adapterhub.serve import attention, bgmv


def _inputs(batch, heads, kv_heads, length, dim, *, seed=0, spare=7):
    """A query as the model makes it (a transposed view) and keys/values as views of a cache buffer
    with spare columns, like the engine's slabs."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, heads, dim, generator=gen).transpose(1, 2)
    keys = torch.randn(batch, kv_heads, length + spare, dim, generator=gen)[:, :, :length]
    values = torch.randn(batch, kv_heads, length + spare, dim, generator=gen)[:, :, :length]
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[::2, ..., : length // 3] = False  # left padding on every other row
    return query, keys, values, mask


def _module(groups):
    return types.SimpleNamespace(num_key_value_groups=groups, is_causal=True)


@pytest.mark.parametrize("isa", bgmv.isas())
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 4), (4, 2)])
@pytest.mark.parametrize("length,dim", [(1, 64), (17, 64), (49, 80), (300, 32)])
def test_the_kernel_equals_sdpa(isa, heads, kv_heads, length, dim):
    query, keys, values, mask = _inputs(5, heads, kv_heads, length, dim, seed=length + dim)
    for m in (mask, mask[:1], None):  # per row, broadcast over rows, none
        expected, _ = sdpa_attention_forward(_module(heads // kv_heads), query, keys, values, m, scaling=dim ** -0.5)
        got = attention.decode(query, keys, values, m, dim ** -0.5, isa=isa)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_masked_positions_weigh_exactly_nothing():
    query, keys, values, mask = _inputs(4, 8, 4, 20, 64)
    values[~mask[:, 0, 0, :][:, None, :, None].expand_as(values)] = 1e30  # what a masked slot holds must not leak
    out, _ = attention.attention(_module(2), query, keys, values, mask, scaling=0.125)
    assert torch.isfinite(out).all()
    row = 0  # padded: only its unmasked tail counts
    keep = mask[row, 0, 0]
    alone = sdpa_attention_forward(_module(2), query[row:row + 1], keys[row:row + 1, :, keep], values[row:row + 1, :, keep],
                                   None, scaling=0.125)[0]
    torch.testing.assert_close(out[row:row + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["prefill", "four query heads per kv head", "softcap", "float mask", "bfloat16"])
def test_what_the_kernel_does_not_take_goes_to_sdpa_unchanged(case):
    heads, kv_heads = (8, 2) if case == "four query heads per kv head" else (8, 4)
    query, keys, values, mask = _inputs(3, heads, kv_heads, 12, 64)
    kwargs = {}
    if case == "prefill":
        query = torch.randn(3, heads, 5, 64)
        mask = torch.ones(3, 1, 5, 12, dtype=torch.bool)
    elif case == "softcap":
        kwargs["softcap"] = None  # present but unset: still the kernel's
    elif case == "float mask":
        mask = torch.zeros(3, 1, 1, 12)
    elif case == "bfloat16":
        query, keys, values = query.bfloat16(), keys.bfloat16(), values.bfloat16()
    calls = []
    real = attention.decode
    attention.decode = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got, _ = attention.attention(_module(heads // kv_heads), query, keys, values, mask, scaling=0.125, **kwargs)
    finally:
        attention.decode = real
    expected, _ = sdpa_attention_forward(_module(heads // kv_heads), query, keys, values, mask, scaling=0.125)
    assert bool(calls) == (case == "softcap"), f"{case}: the kernel should {'' if case == 'softcap' else 'not '}run"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_installed_on_the_engines_model_only(tiny_base_dir):
    from adapterhub.base import load_base

    engine_base, other = load_base(tiny_base_dir), load_base(tiny_base_dir)
    assert attention.install(engine_base.model)
    assert engine_base.model.config._attn_implementation == attention.NAME
    assert other.model.config._attn_implementation == "sdpa", "a model loaded elsewhere keeps its attention"
    ids = torch.tensor([[5, 9, 14, 3, 7], [1, 1, 2, 8, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.inference_mode():  # greedy decoding with a KV cache: prefill through sdpa, steps through the kernel
        ours = engine_base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        theirs = other.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)
