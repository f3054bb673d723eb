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

Siblings that read the same input (a layer's q/k/v projections, its gate/up pair: :data:`GROUPS`)
are packed as ONE weight, as vLLM and SGLang fuse them at load: the first member called runs the
whole GEMM, the others take their columns of its output. The modules, their hooks and their
weights stay separate, so every adapter kind still applies per target module. A member whose input
is not the one the group computed on (a pre-hook scaled it: IA3 on a feed-forward input) runs its
own plain ``F.linear``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's packed linear takes on the CPU
# sibling names that the transformers architectures call on the same input, in one layer
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


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
    bitsandbytes layer is a subclass with its own forward, and stays as it is), siblings of
    :data:`GROUPS` fused into one GEMM unless ``fuse`` is off."""

    def __init__(self, model: torch.nn.Module, fuse: bool = True):
        self.model = model
        self.modules = _linears(model)
        self.groups = _groups(model, self.modules) if fuse else []
        self.installed = False

    def install(self) -> "PackedLinears":
        grouped = {id(m) for group in self.groups for m in group}
        for group in self.groups:
            fused = FusedGroup(group)
            for i, module in enumerate(group):
                module.forward = fused.forward_of(i)
        for module in self.modules:
            if id(module) not in grouped:
                module.forward = _packed_forward(module, _reorder(module.weight))
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


def _groups(model: torch.nn.Module, packable: list[torch.nn.Linear]) -> list[list[torch.nn.Linear]]:
    """Each parent's :data:`GROUPS` siblings that can share one packed weight (all packable, the
    same input width and dtype, biases on all or none)."""
    ok = {id(m) for m in packable}
    found = []
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, torch.nn.Linear) and id(m) in ok for m in members):
                continue
            if len({(m.in_features, m.weight.dtype, m.bias is None) for m in members}) == 1:
                found.append(members)
    return found


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _plain(module: torch.nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """True where oneDNN would not compute the same function: autograd, another dtype or device."""
    grad = torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)
    return grad or x.dtype != dtype or x.device.type != "cpu"


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor) -> Any:
    """``module``'s forward on ``packed``; plain ``F.linear`` where :func:`_plain`."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if _plain(module, x, packed.dtype):
            return F.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")

    return forward


class FusedGroup:
    """Sibling Linears packed as one weight. The first member called with an input runs the whole
    GEMM and keeps the output until every other member has taken its columns of it (a view, so
    nothing is copied); a member called with another input object runs its own ``F.linear``. The
    siblings of :data:`GROUPS` read one tensor that nothing writes between their calls (inference
    tensors keep no version counter to check that)."""

    def __init__(self, modules: list[torch.nn.Linear]):
        self.modules = modules
        self.packed = _reorder(torch.cat([m.weight.detach() for m in modules]))
        self.bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
        starts = [0]
        for m in modules:
            starts.append(starts[-1] + m.out_features)
        self.columns = [(starts[i], m.out_features) for i, m in enumerate(modules)]
        # (input, output, members still to take theirs), swapped whole: a thread never pairs one
        # input with another's output
        self._shared: tuple | None = None

    def forward_of(self, i: int) -> Any:
        return lambda x: self.output(i, x)

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        module = self.modules[i]
        if _plain(module, x, self.packed.dtype):
            return F.linear(x, module.weight, module.bias)
        shared = self._shared
        if shared is not None and i in shared[2]:
            waiting = shared[2] - {i}
            self._shared = (shared[0], shared[1], waiting) if waiting else None
            if shared[0] is not x:
                return F.linear(x, module.weight, module.bias)  # a pre-hook gave this member its own input
            out = shared[1]
        else:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            self._shared = (x, out, frozenset(range(len(self.modules))) - {i})
        start, width = self.columns[i]
        return out.narrow(-1, start, width)
