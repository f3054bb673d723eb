"""One step's adapters: the kinds' parts for the batch's rows, and the hooks that apply them.

The plan is built per step from the rows' (adapter, weight) lists; the slot pool is not. Hooks are
plain ``register_forward_hook`` / ``register_forward_pre_hook`` on the base modules: they do
nothing while no plan is set (the slow path loads PEFT on the same modules), and the model's
structure never changes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapterhub.errors import LimitExceeded

from .kinds import KINDS, Part


class BatchPlan:
    """What the hooks apply for one batch (rows in batch order)."""

    def __init__(self, rows: Sequence[Sequence[tuple[Any, float]]], pool: Any, device: Any, *, backend: Any):
        self.rows = rows
        self.parts: list[Part] = []
        for kind in KINDS:
            mine = [[(e.key, w, e.served) for e, w in row if e.served is not None and kind in e.served.kinds] for row in rows]
            part = kind.step(mine, pool, device, backend) if any(mine) else None
            if part is not None:
                self.parts.append(part)
        self.modules = frozenset().union(*(p.output_modules for p in self.parts))
        self.input_modules = frozenset().union(*(p.input_modules for p in self.parts))
        self.prefix_lengths = [sum(e.served.positions for e, _ in row if e.served is not None) for row in rows]
        self.soft_lengths = [sum(e.served.tokens for e, _ in row if e.served is not None) for row in rows]

    def before(self, module: str, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            if module in part.input_modules:
                x = part.before(module, x)
        return x

    def apply(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            if module in part.output_modules:
                out = part.after(module, x, out)
        return out

    def input_prefix(self) -> list[torch.Tensor | None] | None:
        """Per row, embeddings to put in front of its prompt's (soft prompts), or None when no row has any."""
        for part in self.parts:
            found = part.input_prefix()
            if found is not None:
                return found
        return None

    def prefix_cache(self, num_layers: int, device: Any) -> tuple[list | None, torch.Tensor | None]:
        """Per-layer (keys, values) ``[B, kv_heads, P, head_dim]`` in front of the rows, and their mask ``[B, P]``."""
        for part in self.parts:
            found = part.kv_prefix(num_layers, device)
            if found is not None:
                return found
        return None, None

    def drain(self) -> None:
        for part in self.parts:
            part.drain()


class RowHooks:
    """Forward hooks on base modules that apply the current plan; inert while ``plan`` is None."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.plan: BatchPlan | None = None
        self._hooked: dict[str, Any] = {}
        self._pre_hooked: dict[str, Any] = {}

    def ensure(self, modules: set[str], input_modules: set[str] = frozenset()) -> None:
        """Hook exactly ``modules`` (forward hooks) and ``input_modules`` (forward pre-hooks), by base
        names; call only between forward passes.

        Hooks the plan does not need are removed, not left inert: a module with any forward hook
        takes PyTorch's slow call path, about 2% of a batch-32 decode step over 42 modules.
        """
        self._sync(self._hooked, set(modules), lambda m, name: m.register_forward_hook(self._make_hook(name)))
        self._sync(self._pre_hooked, set(input_modules),
                   lambda m, name: m.register_forward_pre_hook(self._make_pre_hook(name)))

    def _sync(self, hooked: dict[str, Any], wanted: set[str], register) -> None:
        for name in set(hooked) - wanted:
            hooked.pop(name).remove()
        for name in wanted - set(hooked):
            hooked[name] = register(self._module(name), name)

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise LimitExceeded(f"adapter targets module {name!r}, which the base model does not have") from None

    def _make_pre_hook(self, name: str):
        def pre_hook(_module, args):
            plan = self.plan
            if plan is None or name not in plan.input_modules:
                return None
            return (plan.before(name, args[0]),) + tuple(args[1:])

        return pre_hook

    def _make_hook(self, name: str):
        def hook(_module, args, output):
            plan = self.plan
            if plan is None or name not in plan.modules:
                return output
            if isinstance(output, tuple):
                return (plan.apply(name, args[0], output[0]),) + output[1:]
            return plan.apply(name, args[0], output)

        return hook

    def remove(self) -> None:
        for handle in list(self._hooked.values()) + list(self._pre_hooked.values()):
            handle.remove()
        self._hooked.clear()
        self._pre_hooked.clear()
