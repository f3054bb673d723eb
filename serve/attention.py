"""Decode-step attention for the engine's model, through transformers' ``AttentionInterface``.

A decode step feeds one token per row. PyTorch's ``scaled_dot_product_attention`` on the CPU spends
most of that step's attention on dispatching a tiny matrix product per (row, head): 10-20% of a
batch-128 step on the small base. The C kernel (``_bgmv.c``) makes one pass over the cached keys
and values instead, reading the cache's strided buffers in place (reached through the CPU backend's
module, :mod:`.lora_backends.cpu_c`, the one entry to the extension). Everything else (prefills,
masks it does not know, other devices or dtypes, dropout, soft-capping, sliding windows, sinks)
goes to transformers' own ``sdpa`` function unchanged.

:func:`install` registers the function as ``attn_implementation="adapterhub"`` (with sdpa's mask
builder) and switches one model to it; models loaded elsewhere keep theirs.
"""

from __future__ import annotations

from typing import Any

import torch

from . import one_pass
from .lora_backends import cpu_c

NAME = "adapterhub"
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "position_bias")  # kwargs this kernel cannot honour
# query heads per key/value head up to which the kernel wins: measured at batch 128, 49 cached
# tokens, head dim 64: 1.9x faster than sdpa at 1, 3.6x at 2, even at 4 (sdpa's packed-GQA
# products amortise its dispatch there)
MAX_GROUP = 2


def install(model: Any) -> bool:
    """Use this attention in ``model`` (True), where it runs sdpa and the kernel is built."""
    if not cpu_c.available() or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query [B, H, q, D]``, ``key``/``value [B, KV, T, D]``;
    returns ``[B, q, H, D]`` (and no weights). In a step's one pass (:mod:`one_pass`) its layout
    says which rows attend together."""
    layout = one_pass.active()
    if layout is not None:
        return layout.attend(module, query, key, value, scaling, _one_layout), None
    return _one_layout(module, query, key, value, attention_mask, scaling, dropout, is_causal, **kwargs), None


def _one_layout(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None, dropout: float = 0.0,
                is_causal: bool | None = None, **kwargs: Any) -> torch.Tensor:
    if not _fits(query, key, value, attention_mask, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)[0]
    return decode(query, key, value, attention_mask, scaling)


def decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           scaling: float | None, *, isa: str | None = None) -> torch.Tensor:
    """The kernel on inputs :func:`_fits` accepted: ``[B, 1, H, D]``."""
    return cpu_c.decode_attention(query, key, value, attention_mask, scaling, isa=isa)


def _fits(query, key, value, mask, dropout, kwargs) -> bool:
    """One query token per row, float32 CPU tensors with contiguous head dims, at most
    :data:`MAX_GROUP` query heads per key/value head, a boolean ``[B or 1, 1, 1, T]`` mask or none,
    and nothing the kernel does not implement."""
    if query.dim() != 4 or query.shape[2] != 1 or dropout or any(kwargs.get(k) is not None for k in _UNSUPPORTED):
        return False
    batch, heads, _, dim = query.shape
    if key.dim() != 4 or key.shape != value.shape or key.shape[0] != batch or key.shape[3] != dim:
        return False
    if heads % key.shape[1] or heads // key.shape[1] > MAX_GROUP:
        return False
    if not all(t.dtype == torch.float32 and t.is_cpu and t.stride(-1) == 1 for t in (query, key, value)):
        return False
    return mask is None or (mask.dtype == torch.bool and mask.is_cpu and mask.dim() == 4 and mask.shape[0] in (1, batch)
                            and mask.shape[1:] == (1, 1, key.shape[2]) and mask.stride(-1) == 1)
