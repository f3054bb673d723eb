"""Adapters as plain tensors, in the few shapes the server knows how to apply per row.

A method's ``serving_form`` hook turns its saved adapter into one of
these; the server's engine stacks forms of the same kind from many adapters and applies them with
gathered batched matmuls, so one forward pass serves rows with different adapters. Module names
are those of the *base* model (``model.layers.0.self_attn.q_proj``), never of a PEFT wrapper.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Union

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

    deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])
    scales: dict[str, float] = dataclasses.field(default_factory=dict)  # module -> factor on B (missing: 1)


class LoraDeltas(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """The ``deltas`` of a LoRA state dict: module -> (A, B), the pair looked up when asked for.

    Over :meth:`AdapterFiles.tensor_views` (a file's bytes), :meth:`raw` says where each pair lies
    in them: the server's slot write reads them in place and no tensor is ever made (making the 84
    views of a rank-16 LoRA on every linear layer of a small model costs more than the rest of
    its load).
    """

    def __init__(self, state: Mapping[str, torch.Tensor], keys: dict[str, tuple[str, str]]):
        missing = [key for pair in keys.values() for key in pair if key not in state]
        if missing:
            raise KeyError(f"LoRA state has no tensor {missing[0]!r}")
        self._state, self._keys = state, keys

    def __getitem__(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._keys[module]
        return self._state[a], self._state[b]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def in_file(self) -> bool:
        """Whether the pairs lie in a file's bytes (then :meth:`raw` works and nothing needs a gradient)."""
        return hasattr(self._state, "raw")

    def raw(self, module: str):
        """(A, B) as :class:`~adapterhub.adapter_files.RawTensor` (needs :attr:`in_file`)."""
        a, b = self._keys[module]
        return self._state.raw(a), self._state.raw(b)


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


@dataclasses.dataclass
class BiasForm:
    """Changes to Linear biases (BitFit): ``y = base(x) + b``, per module ``b [out]``."""

    biases: dict[str, torch.Tensor]  # module -> [out]


@dataclasses.dataclass
class DoraForm:
    """Weight-decomposed LoRA (DoRA): ``y = m / ||W + s BA||_row * (W x + s B A x)`` (+ the bias).

    ``lora`` is the low-rank part as a :class:`LoraForm`; ``magnitudes[m] [out]`` the learned
    magnitude. The server computes the row norms of ``W + s BA`` once, when the adapter loads
    (dequantising a 4-bit base weight for that once), so a row costs a LoRA delta and a channel scale.
    """

    lora: LoraForm
    magnitudes: dict[str, torch.Tensor]  # module -> [out]


@dataclasses.dataclass
class SparseForm:
    """A sparse change to Linear weights (SHiRA): ``y = base(x) + x @ S.T`` with ``S [out, in]`` zero but
    at ``indices``: per module ``(indices [2, nnz]`` (row = output, column = input; any integer
    dtype), ``values [nnz])``. Scaling folded into the values."""

    deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (indices [2, nnz], values [nnz])


@dataclasses.dataclass
class SoftPromptForm:
    """Virtual-token embeddings put in front of a row's input embeddings (prompt tuning, P-tuning's
    saved encoder output): ``[num_virtual_tokens, hidden]``. They take positions 0..P-1."""

    embeddings: torch.Tensor


ServingForm = Union[LoraForm, ScaleForm, BottleneckForm, PrefixForm, BiasForm, DoraForm, SoftPromptForm, SparseForm]
