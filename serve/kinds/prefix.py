"""Prefixes (``PrefixForm``): per-layer key/value prefixes in front of each row's own cache.

Not stacked: an adapter's prefix is copied to the device once when it loads; a step concatenates
each row's prefixes in request order, right-aligned, rows with shorter or no prefixes getting masked
zero padding. A prefix takes key positions (``Served.positions``) and cannot be weighted.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterhub.errors import LimitExceeded
from adapterhub.serving_forms import PrefixForm

from .base import Kind, Part, Served


class PrefixKind(Kind):
    name = "prefix"
    form_type = PrefixForm
    stacked = False

    def admit(self, pool: Any, key: str, form: PrefixForm) -> Served:
        keys, values = (t.detach().to(device=pool.device, dtype=torch.float32).contiguous() for t in (form.keys, form.values))
        return Served(self, positions=keys.shape[2], data=(keys, values))

    def check_weight(self, key: str, weight: float) -> None:
        if weight != 1.0:
            raise LimitExceeded(f"adapter {key} is a prefix; prefixes cannot be weighted (use weight 1)")

    def step(self, rows, pool, device, backend) -> Part | None:
        if not any(rows):
            return None
        return PrefixPart([[served.data for _, _, served in row] for row in rows])


class PrefixPart(Part):
    def __init__(self, rows: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        self.rows = rows

    def kv_prefix(self, num_layers: int, device: Any) -> tuple[list, torch.Tensor] | None:
        lengths = [sum(k.shape[2] for k, _ in row) for row in self.rows]
        width = max(lengths)
        sample = next(k for row in self.rows for k, _ in row)
        _, heads, _, dim = sample.shape
        keys = sample.new_zeros(num_layers, len(self.rows), heads, width, dim)
        values = torch.zeros_like(keys)
        mask = torch.zeros(len(self.rows), width, dtype=torch.long, device=device)
        for b, row in enumerate(self.rows):
            if not row:
                continue
            n = lengths[b]
            keys[:, b, :, width - n:] = torch.cat([k for k, _ in row], dim=2)
            values[:, b, :, width - n:] = torch.cat([v for _, v in row], dim=2)
            mask[b, width - n:] = 1
        return [(keys[layer], values[layer]) for layer in range(num_layers)], mask
