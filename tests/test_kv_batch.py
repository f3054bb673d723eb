"""The running rows' key/value cache (``serve/kv_batch.py``): joining newcomers, then decoding in place."""

from __future__ import annotations

import torch

from adapterhub.serve.kv_batch import KVBatch

LAYERS, HEADS, DIM = 2, 3, 4


def batch(name: str, rows: int, width: int, seed: int) -> KVBatch:
    gen = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(rows, HEADS, width, DIM, generator=gen), torch.randn(rows, HEADS, width, DIM, generator=gen))
              for _ in range(LAYERS)]
    return KVBatch([f"{name}{i}" for i in range(rows)], layers, torch.ones(rows, width, dtype=torch.long), [0] * rows)


def test_join_right_aligns_each_side_behind_zeros_and_keeps_its_rows_in_order():
    a, b = batch("a", 2, 5, 0), batch("b", 3, 8, 1)
    joined = a.join(b)
    assert joined.rows == ["a0", "a1", "b0", "b1", "b2"]
    assert joined.starts == [3, 3, 0, 0, 0]
    assert joined.mask[:2].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]] * 2 and bool(joined.mask[2:].all())
    for layer, left, right in zip(joined.layers, a.layers, b.layers):
        for got, first, second in ((layer.keys, left.keys, right.keys), (layer.values, left.values, right.values)):
            assert got.shape == (5, HEADS, 8, DIM)
            assert torch.equal(got[:2, :, 3:], first) and not got[:2, :, :3].any()  # zeros, not stale memory
            assert torch.equal(got[2:], second)


def test_a_joined_layer_writes_the_next_token_in_place():
    joined = batch("a", 2, 5, 0).join(batch("b", 1, 6, 1))
    layer = joined.layers[0]
    buffer, before = layer._k, layer.keys.clone()
    step = torch.randn(3, HEADS, 1, DIM), torch.randn(3, HEADS, 1, DIM)
    keys, values = layer.update(*step)
    assert layer._k is buffer  # the spare columns took it: nothing was copied
    assert torch.equal(keys[:, :, :6], before) and torch.equal(keys[:, :, 6:], step[0])
    assert torch.equal(values[:, :, 6:], step[1])
