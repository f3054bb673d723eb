"""BitFit: train only bias terms (Ben Zaken et al., 2021).

Llama-style bases have no biases, so each targeted Linear gets a zero bias parameter (frozen, part
of the base) and a trainable zero-initialised bias *change* beside it, added by a forward hook.
The effective bias is ``base bias + change``, which is plain BitFit; keeping the change apart lets
merge write it into the base bias and unmerge restore the base bias exactly. Saved: only the
changes, under the base's bias names (``model.layers.0.self_attn.q_proj.bias``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import adapterhub
from adapterhub import Capabilities, ConfigError, MergeError, MethodConfig, option
from adapterhub.plugins import _modules as M
from adapterhub.plugins._peft import refuse_quantized
from adapterhub.serving_forms import BiasForm

CHILD = "bitfit"


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    method_name = "bitfit"

    target_modules: list[str] = option(
        ["all-linear"], "Linear layers in decoder layers whose bias trains ('all-linear' or suffixes: q_proj,mlp.down_proj)"
    )

    def validate(self) -> None:
        if not self.target_modules:
            raise ConfigError("bitfit config: target_modules is empty; e.g. --set target_modules=all-linear")


class BiasChange(nn.Module):
    """The trained change to one Linear's bias; ``created`` when the base had no bias."""

    def __init__(self, owner: nn.Module, created: bool):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(M.out_features(owner), device=owner.weight.device, dtype=torch.float32))
        self.created = created
        self.merged = False
        self.register_buffer("original", None, persistent=False)
        owner.add_module(CHILD, self)
        self.handle = owner.register_forward_hook(self._hook)

    def _hook(self, owner: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return None if self.merged else output + self.bias.to(output.dtype)


def changes(model: nn.Module) -> list[tuple[str, nn.Linear, BiasChange]]:
    return [(n, m, c) for n, m in model.named_modules() if isinstance(c := getattr(m, CHILD, None), BiasChange)]


class BitFitMethod(adapterhub.Method):
    name = "bitfit"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 1.00.
    recommended_options = {"lr": 5e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = BitFitConfig
    # No quantized base for training: merging writes base biases, and bitsandbytes layers are not our
    # Linear. Served per row (BiasForm) on any base, the changes being added after the module.
    capabilities = Capabilities(mergeable=True, quantized_base=False, mixed_batch=True, composable=True)
    foldable_bottom = True  # its change adds to the layer's output: merged under a top, as the server composes it
    description = "BitFit: train only bias terms (zero biases added where the base has none)."

    def attach(self, model: nn.Module, config: BitFitConfig) -> nn.Module:
        refuse_quantized(self, model)
        if changes(model):
            raise ConfigError("bitfit: the model already carries a bitfit adapter; detach it first")
        targets = M.decoder_linears(model, config.target_modules)
        if not targets:
            raise ConfigError(f"bitfit config: target_modules={config.target_modules} matches no Linear layer "
                              "in the decoder layers; use all-linear or names such as q_proj")
        M.freeze_all(model)
        for _, linear in targets:
            created = linear.bias is None
            if created:
                linear.bias = nn.Parameter(linear.weight.new_zeros(M.out_features(linear)), requires_grad=False)
            BiasChange(linear, created)
        model.adapterhub_bitfit_config = config.to_dict()
        return model

    def save(self, model: nn.Module, directory: str | Path) -> None:
        found = changes(model)
        if not found:
            raise ConfigError("bitfit: this model carries no bitfit adapter to save")
        config = getattr(model, "adapterhub_bitfit_config", None) or {}
        M.write_adapter(directory, self.name, config, {f"{n}.bias": c.bias for n, _, c in found})

    def load(self, model: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
        config = self.make_config(M.read_config(directory, self.name))
        tensors = M.read_tensors(directory)
        self.attach(model, config)
        found = {f"{n}.bias": c for n, _, c in changes(model)}
        if set(found) != set(tensors):
            missing = sorted(set(found) ^ set(tensors))[:3]
            raise ConfigError(f"bitfit: {directory} does not fit this base (mismatched biases, e.g. {missing}); "
                              "load it on the base it was trained on")
        with torch.no_grad():
            for key, change in found.items():
                change.bias.copy_(tensors[key])
                change.bias.requires_grad_(trainable)
        return model

    def serving_form(self, files: adapterhub.AdapterFiles, base_config: Any) -> BiasForm:
        """The bias changes by module (saved under the base's bias names)."""
        return BiasForm({key.removesuffix(".bias"): t for key, t in files.read_tensors().items()})

    def detach(self, model: nn.Module) -> nn.Module:
        for _, linear, change in changes(model):
            change.handle.remove()
            delattr(linear, CHILD)
            if change.created and not change.merged:
                linear.bias = None
        model.__dict__.pop("adapterhub_bitfit_config", None)
        return model

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        found = changes(model)
        if not found:
            raise MergeError("bitfit: no loaded adapter to merge; load one first")
        if any(c.merged for _, _, c in found):
            raise MergeError("bitfit: the adapter is already merged; unmerge it first")
        new = [(linear, c, linear.bias + c.bias.to(linear.bias.dtype)) for _, linear, c in found]
        for name, (_, _, value) in zip((n for n, _, _ in found), new):
            M.check_finite(self.name, f"{name}.bias", value)
        for linear, c, value in new:
            c.original = linear.bias.detach().clone()
            linear.bias.copy_(value)
            c.merged = True

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        found = [(linear, c) for _, linear, c in changes(model) if c.merged]
        if not found:
            raise MergeError("bitfit: nothing to unmerge; the adapter is not merged")
        for linear, c in found:
            linear.bias.copy_(c.original)
            c.original = None
            c.merged = False


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(BitFitMethod())
