"""Soft prompts (``SoftPromptForm``: prompt tuning, P-tuning): virtual-token embeddings in front of
a row's input embeddings, prefilled once with the prompt.

Not stacked: an adapter's embeddings are copied to the device once when it loads. Several in a
composition concatenate in request order. The virtual tokens take the first positions of their
row (as PEFT gives them), so the row's own tokens and everything it generates come after them;
they cannot be weighted.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterhub.errors import LimitExceeded
from adapterhub.serving_forms import SoftPromptForm

from .base import Kind, Part, Served


class SoftPromptKind(Kind):
    name = "soft_prompt"
    form_type = SoftPromptForm
    stacked = False

    def admit(self, pool: Any, key: str, form: SoftPromptForm) -> Served:
        embeddings = form.embeddings.detach()
        hidden = pool.model.get_input_embeddings().embedding_dim if pool.model is not None else embeddings.shape[-1]
        if embeddings.dim() != 2 or embeddings.shape[1] != hidden:
            raise LimitExceeded(f"adapter {key}: soft prompt of shape {tuple(embeddings.shape)} does not fit this "
                                f"base's embeddings of width {hidden}")
        embeddings = embeddings.to(device=pool.device, dtype=torch.float32).contiguous()
        return Served(self, tokens=embeddings.shape[0], data=embeddings)

    def check_weight(self, key: str, weight: float) -> None:
        if weight != 1.0:
            raise LimitExceeded(f"adapter {key} is a soft prompt; soft prompts cannot be weighted (use weight 1)")

    def step(self, rows, pool, device, backend) -> Part | None:
        if not any(rows):
            return None
        return SoftPromptPart([torch.cat([served.data for _, _, served in row]) if row else None for row in rows])


class SoftPromptPart(Part):
    def __init__(self, rows: list[torch.Tensor | None]):
        self.rows = rows

    def input_prefix(self) -> list[torch.Tensor | None]:
        return self.rows
