"""Adapters as plain tensors, in the few shapes the server knows how to apply per row.

A method's ``serving_form`` (or ``serving_form_from_files``) turns its saved adapter into one of
these; the server's engine stacks forms of the same kind from many adapters and applies them with
gathered batched matmuls, so one forward pass serves rows with different adapters. Module names
are those of the *base* model (``model.layers.0.self_attn.q_proj``), never of a PEFT wrapper.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch


@dataclasses.dataclass
class LoraForm:
    """Low-rank deltas on Linear layers: ``y = base(x) + (x @ A.T) @ (scales[m] * B).T``.

    ``B`` times ``scales.get(module, 1)`` includes the method's scaling (alpha / r and any learned
    singular values), so the server needs no method-specific arithmetic. A plain factor belongs in
    ``scales``: the server multiplies while it writes ``A.T`` and ``B.T`` into its stacks (one
    pass over each tensor, as it loads), where scaling B first would be a pass of its own. Covers
    LoRA, QLoRA, LoRA+, AdaLoRA. Any layout will do; float32 ``A`` and ``B`` as the file holds them
    (contiguous) take the fastest write.
    """

    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])
    scales: dict[str, float] = dataclasses.field(default_factory=dict)  # module -> factor on B (missing: 1)


@dataclasses.dataclass
class ScaleForm:
    """Learned elementwise scales (IA3): ``y = base(x) * s`` or ``y = base(x * s)``."""

    output_scales: dict[str, torch.Tensor]  # module -> [out]
    input_scales: dict[str, torch.Tensor]  # module -> [in]


@dataclasses.dataclass
class BottleneckForm:
    """Bottleneck adapters on a module's output: ``h = h + up(act(down(h)))``."""

    activation: str  # a name from torch.nn.functional: "relu", "gelu", "silu", "tanh"
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    # module -> (down.weight [r, h], down.bias [r], up.weight [h, r], up.bias [h])


@dataclasses.dataclass
class PrefixForm:
    """Per-layer key/value prefixes prepended to attention (prefix tuning, P-tuning v2).

    ``keys`` and ``values`` are ``[num_layers, num_kv_heads, num_virtual_tokens, head_dim]``.
    """

    keys: torch.Tensor
    values: torch.Tensor


ServingForm = Union[LoraForm, ScaleForm, BottleneckForm, PrefixForm]
