"""Fused RMSNorm (``serve/fused_norm.py``): switched only where ``F.rms_norm`` gives the module's own
bits, the whole model's logits unchanged, another norm left alone, and plain again once removed."""

from __future__ import annotations

import torch

from adapterhub.serve import fused_norm


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_the_models_norms_are_fused_and_its_logits_keep_every_bit(tiny_model):
    ids = torch.tensor([[5, 17, 42, 99, 3], [8, 8, 1, 250, 77]])
    plain = _logits(tiny_model, ids)
    norms = fused_norm.FusedNorms(tiny_model).install()
    assert len(norms.modules) == 2 * len(tiny_model.model.layers) + 1  # two a layer, and the final one
    assert torch.equal(_logits(tiny_model, ids), plain)
    norms.remove()
    assert not any("forward" in m.__dict__ for m in norms.modules)


def test_a_norm_that_computes_something_else_keeps_its_forward():
    class GemmaLikeRMSNorm(torch.nn.Module):  # Gemma scales by (1 + weight)
        def __init__(self, dim):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(dim))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = torch.nn.Sequential(GemmaLikeRMSNorm(16))
    assert fused_norm.FusedNorms(model).modules == []


def test_half_precision_and_autograd_take_the_modules_own_forward(tiny_model):
    norm = tiny_model.model.norm
    fused_norm.FusedNorms(tiny_model).install()
    x = torch.randn(2, 3, norm.weight.shape[0], requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    half = torch.randn(2, 3, norm.weight.shape[0]).to(torch.bfloat16)
    own = type(norm).forward(norm, half)
    assert norm(half).dtype == own.dtype and torch.equal(norm(half), own)
