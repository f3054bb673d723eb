"""Layer freezing: fine-tune only the top decoder layers, or parameters matching patterns.

The trained parameters change in place during training (that is what freezing the rest means);
the adapter saved is only their change, ``trained - original``, as safetensors. Loading keeps that
change apart from the base weights (a :class:`~adapterhub.plugins._modules.WeightOverlay` adds it
at forward time), so merge folds it in and unmerge restores the base bit for bit.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from pathlib import Path

import torch.nn as nn

import adapterhub
from adapterhub import Capabilities, ConfigError, MethodConfig, option
from adapterhub.architectures import layer_index_of
from adapterhub.plugins import _modules as M
from adapterhub.plugins._peft import refuse_quantized


@dataclasses.dataclass
class FreezeConfig(MethodConfig):
    method_name = "freeze"

    top_k_layers: int = option(8, "train the top K decoder layers (0: none; use patterns instead)")
    patterns: list[str] = option(
        [], "also train parameters whose names match: globs (fnmatch, e.g. 'lm_head.*') or 're:REGEX'"
    )

    def validate(self) -> None:
        if self.top_k_layers < 0:
            raise ConfigError(f"freeze config: top_k_layers={self.top_k_layers} must be >= 0, e.g. --set top_k_layers=2")
        if self.top_k_layers == 0 and not self.patterns:
            raise ConfigError("freeze config: nothing to train; set top_k_layers >= 1 or patterns=lm_head.*")
        for p in self.patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise ConfigError(f"freeze config: pattern {p!r} is not a valid regex ({exc})") from None


def selected_parameters(model: nn.Module, config: FreezeConfig) -> list[str]:
    """Names of the parameters ``config`` trains (unique tensors, base names).

    "Top layers" are the base's decoder layers as :mod:`adapterhub.architectures` finds them
    (``model.layers.N``, ``transformer.h.N``, ``gpt_neox.layers.N``...).
    """
    names = [n for n, _ in model.named_parameters()]
    layer_index = layer_index_of(model)
    depth = 1 + max((i for n in names if (i := layer_index(n)) is not None), default=-1)
    top = set(range(depth - config.top_k_layers, depth))

    def matches(name: str) -> bool:
        for p in config.patterns:
            if (re.search(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p)):
                return True
        return layer_index(name) in top

    chosen = [n for n in names if matches(n)]
    if not chosen:
        raise ConfigError(
            f"freeze config selects no parameter of this model (top_k_layers={config.top_k_layers}, "
            f"patterns={config.patterns}); parameter names look like {names[0]!r}"
        )
    return chosen


class FreezeMethod(adapterhub.Method):
    name = "freeze"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps), top 8 layers: flip 0.78 (top 2 at 1e-3: 0.16; top 15 at 3e-4: 1.00).
    recommended_options = {"lr": 1e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = FreezeConfig
    capabilities = Capabilities(mergeable=True, quantized_base=False, mixed_batch=False, composable=False)
    description = "Layer freezing: train the top-k decoder layers or parameters matching patterns; saves the delta."

    def attach(self, model: nn.Module, config: FreezeConfig) -> nn.Module:
        refuse_quantized(self, model)
        if M.overlays(model):
            raise ConfigError("freeze: the model already carries a freeze/full adapter; detach it first")
        M.freeze_all(model)
        M.attach_live(model, selected_parameters(model, config))
        model.adapterhub_freeze_config = config.to_dict()
        return model

    def save(self, model: nn.Module, directory: str | Path) -> None:
        deltas = M.current_deltas(model)
        if not deltas:
            raise ConfigError("freeze: this model carries no freeze adapter to save")
        config = getattr(model, "adapterhub_freeze_config", None) or {}
        M.write_adapter(directory, self.name, config, deltas)

    def load(self, model: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
        refuse_quantized(self, model)
        config = self.make_config(M.read_config(directory, self.name))
        deltas = M.read_tensors(directory)
        if trainable:  # continue training: apply the change in place, keep originals
            self.attach(model, config)
            params = dict(model.named_parameters())
            for name, delta in deltas.items():
                params[name].data.add_(delta.to(params[name].device))
        else:
            M.freeze_all(model)
            M.attach_deltas(model, deltas)
            model.adapterhub_freeze_config = config.to_dict()
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        model.__dict__.pop("adapterhub_freeze_config", None)
        return M.remove_overlays(model)

    def merge(self, model: nn.Module) -> None:
        M.merge_overlays(model, self.name)

    def unmerge(self, model: nn.Module) -> None:
        M.unmerge_overlays(model, self.name)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(FreezeMethod())
