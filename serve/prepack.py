"""The base's Linear weights reordered once, at load, into oneDNN's blocked layout (what vLLM's CPU
backend does with its ``create_onednn_mm`` handlers), so that a step's GEMMs stop repacking them.

``F.linear`` on the CPU calls MKL's sgemm, which copies the weight into its own blocked layout on
every call, which at a decode step's 1-32 rows is a large part of the work: on SmolLM2 at 16 rows a
decode step takes 0.81x the time prepacked and a 16-prompt prefill 0.85x (``python -m bench
prepack``).

The packed copy is a second copy of each weight (SmolLM2 fp32: +0.5 GB); the original stays, for
everything that reads a weight (DoRA's norms, PEFT on the exclusive path, training). Anything that
writes base weights must do it inside :meth:`PackedLinears.paused`, which restores plain
``F.linear`` and repacks afterwards: the engine's exclusive path does. Modules keep their class and
their hooks; only the instance's ``forward`` changes, and :meth:`~PackedLinears.remove` (the
engine's stop) takes it back.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's packed linear takes on the CPU


def supported(model: torch.nn.Module) -> str | None:
    """None when ``model``'s Linear weights can be packed here, else why not."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN"
    linears = _linears(model)
    if not linears:
        return "the base has no float Linear layers on the CPU (a quantized or GPU base)"
    return None


class PackedLinears:
    """The packed forwards of ``model``'s CPU float ``nn.Linear`` layers (exactly that class: a
    bitsandbytes layer is a subclass with its own forward, and stays as it is)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = _linears(model)
        self.installed = False

    def install(self) -> "PackedLinears":
        for module in self.modules:
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            module.forward = _packed_forward(module, packed)
        self.installed = True
        return self

    def remove(self) -> None:
        """Back to each class's own forward (the packed copies are freed)."""
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.installed = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Plain ``F.linear`` inside (base weights may change), packed again from the weights as they are after."""
        if not self.installed:
            yield
            return
        self.remove()
        try:
            yield
        finally:
            self.install()


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    seen: set[int] = set()
    found = []
    for module in model.modules():
        if type(module) is torch.nn.Linear and id(module) not in seen and module.weight.device.type == "cpu" \
                and module.weight.dtype in DTYPES:
            seen.add(id(module))
            found.append(module)
    return found


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor) -> Any:
    """``module``'s forward on ``packed``; plain ``F.linear`` where oneDNN would not give the same
    function (autograd, another dtype or device)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)
        if grad or x.dtype != packed.dtype or x.device.type != "cpu":
            return torch.nn.functional.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")

    return forward
