"""DoRA (``DoraForm``): a LoRA delta, then a per-output-channel scale ``m / ||W + s BA||_row``.

For a row with a DoRA adapter a module gives ``c * (W x + delta) + (1 - c) * bias`` (PEFT's DoRA:
the magnitude rescales the adapted weight, not the bias). The LoRA part lives in the LoRA kind's
stacks and is applied by its step; ``c`` is computed once when the adapter loads, from the base
weight (a 4-bit one dequantised for that once), and gathered per row from a stack whose empty
slots are ones. The scale normalises the weight it adapts, so another adapter changing the same
layers' outputs (LoRA, IA3, BitFit, another DoRA) would have no defined place: such compositions
are refused; bottleneck adapters and prefixes, which act outside the layer, compose.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterhub.errors import LimitExceeded
from adapterhub.serving_forms import DoraForm

from .base import Kind, Part, Served, Slots, write_parts


class DoraKind(Kind):
    name = "dora"
    form_type = DoraForm
    pad = 1.0

    def __init__(self, lora: Kind):
        self.lora = lora  # whose stacks hold the low-rank part

    def stack_dtype(self, pool: Any) -> torch.dtype:
        return torch.float32

    def admit(self, pool: Any, key: str, form: DoraForm) -> Served:
        if pool.model is None:
            raise LimitExceeded(f"adapter {key} is DoRA: its scale needs the base's weights, and this pool has none")
        pool.stack(self.lora).admit(key, form.lora)
        pool.stack(self).admit(key, form)
        return Served(self, kinds=(self.lora, self))

    def write(self, stack: Any, slot: int, form: DoraForm) -> None:
        from peft.utils.integrations import dequantize_module_weight

        model = stack.pool.model
        scales = {}
        for module, magnitude in form.magnitudes.items():
            layer = model.get_submodule(module)
            weight = dequantize_module_weight(layer).to(torch.float32)
            a, b = (t.to(weight.device, torch.float32) for t in form.lora.deltas[module])
            if _stores_transposed(layer):  # GPT-2's Conv1D keeps W as [in, out] (PEFT's fan_in_fan_out)
                weight = weight.T
            adapted = weight + form.lora.scales.get(module, 1.0) * (b @ a)
            scales[module] = (magnitude.to(weight.device, torch.float32) / adapted.norm(p=2, dim=1),)
        write_parts(stack, slot, scales)

    def check_weight(self, key: str, weight: float) -> None:
        if weight != 1.0:
            raise LimitExceeded(f"adapter {key} is DoRA, whose weight norm is fixed when it loads; use weight 1")

    def check_company(self, key: str, others) -> None:
        clash = [o for o in others if o is not None and {k.name for k in o.kinds} & {"lora", "dora", "scale", "bias"}]
        if clash:
            raise LimitExceeded(
                f"adapter {key} is DoRA: its magnitude rescales the layer it adapts, so composing it with another "
                f"adapter that changes those layers ({clash[0].kind.name}) has no defined result; compose DoRA with "
                "bottleneck adapters or prefixes, or merge it into the base first")

    def step(self, rows, pool, device, backend) -> Part | None:
        stack = pool.stack(self)
        slots = stack.gather([[(key, w) for key, w, _ in row] for row in rows], device)
        if slots is None:
            return None
        biases = {m: pool.model.get_submodule(m).bias for m in stack.tensors}
        return DoraPart(slots, stack.tensors, biases)


def _stores_transposed(layer: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


class DoraPart(Part):
    def __init__(self, slots: Slots, tensors: dict[str, list[torch.Tensor]], biases: dict[str, Any]):
        self.slots, self.tensors, self.biases = slots, tensors, biases
        self.output_modules = frozenset(tensors)

    def after(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        c = self.tensors[module][0][self.slots.index[:, 0]][:, None, :]  # [B, 1, out]: one DoRA a row at most
        scaled = out.float() * c
        bias = self.biases[module]
        if bias is not None:
            scaled = scaled + (1 - c) * bias.float()
        return scaled.to(out.dtype)
