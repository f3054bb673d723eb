"""The plain-torch LoRA backend: correct on any device, the reference the others are tested against.

One pair of matmuls per segment (a run of tokens sharing an adapter and weight), in float32. On a
GPU that is a launch per segment: fine for a few adapters per batch, which is where it is used
when no faster backend applies.
"""

from __future__ import annotations

import torch

from .contract import LoraBackend, TokenSlots


class TorchLora(LoraBackend):
    name = "torch"

    def supports(self, stack_dtype: torch.dtype, rank: int) -> bool:
        return stack_dtype.is_floating_point

    def add(self, x: torch.Tensor, A_T: torch.Tensor, B_T: torch.Tensor, tokens: TokenSlots, out: torch.Tensor) -> None:
        for start, end, slot, weight in tokens.segments:
            h = x[start:end].float() @ A_T[slot].float()
            y = (h * weight) @ B_T[slot].float() if weight != 1.0 else h @ B_T[slot].float()
            out[start:end] += y.to(out.dtype)


def lora_delta(x: torch.Tensor, A_T: torch.Tensor, B_T: torch.Tensor, slots: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """The delta token by token with gathered weights, float64: the ground truth in unit tests."""
    a, b = A_T[slots].double(), B_T[slots].double()
    h = torch.bmm(x.double()[:, None, :], a)
    if weights is not None:
        h = h * weights.double()[:, None, None]
    y = torch.bmm(h, b)[:, 0, :]
    return torch.where((slots > 0)[:, None], y, torch.zeros_like(y))
