"""Full fine-tuning: every weight trains; the adapter is a whole Hugging Face model directory.

Saved with ``save_pretrained`` (safetensors) plus our ``full_config.json``, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads the fine-tuned model with no adapterhub code. Loading it *as an adapter* onto a base keeps
the fine-tuned weights apart from the base ones (a
:class:`~adapterhub.plugins._modules.WeightOverlay` per module applies the difference at forward
time), so merge swaps the saved weights in exactly and unmerge swaps the originals back bit for bit.
That costs two extra copies of the changed weights; serve a full fine-tune merged (or load it
directly) when memory matters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import adapterhub
from adapterhub import Capabilities, ConfigError, MethodConfig, NotFound, option
from adapterhub.plugins import _modules as M
from adapterhub.plugins._peft import refuse_quantized

# Not adapter_config.json: from_pretrained would take the directory for a PEFT adapter.
CONFIG_FILE = "full_config.json"


@dataclasses.dataclass
class FullConfig(MethodConfig):
    method_name = "full"

    train_embeddings: bool = option(True, "also train the input embeddings (False freezes embed_tokens)")


class FullMethod(adapterhub.Method):
    name = "full"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 0.97 (every weight moves: a small lr).
    recommended_options = {"lr": 5e-5, "epochs": 3.0, "warmup_steps": 5}
    config_class = FullConfig
    capabilities = Capabilities(mergeable=True, quantized_base=False, mixed_batch=False, composable=False)
    description = "Full fine-tuning: every weight trains; saved as a plain Hugging Face model directory."

    def attach(self, model: nn.Module, config: FullConfig) -> nn.Module:
        refuse_quantized(self, model)
        frozen = set() if config.train_embeddings else {id(p) for p in model.get_input_embeddings().parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        model.adapterhub_full_config = config.to_dict()
        return model

    def save(self, model: nn.Module, directory: str | Path) -> None:
        unmerged = bool(M.overlays(model)) and not any(ov.merged for _, ov in M.overlays(model))
        if unmerged:  # a loaded full adapter: write the fine-tuned weights, not the base
            M.merge_overlays(model, self.name)
        try:
            model.save_pretrained(str(directory), safe_serialization=True)
        finally:
            if unmerged:
                M.unmerge_overlays(model, self.name)
        config = getattr(model, "adapterhub_full_config", None) or FullConfig().to_dict()
        M.write_adapter(directory, self.name, config, None, config_file=CONFIG_FILE)

    def load(self, model: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
        refuse_quantized(self, model)
        config = self.make_config(M.read_config(directory, self.name, config_file=CONFIG_FILE))
        tuned = _read_model_weights(Path(directory))
        params = dict(model.named_parameters())
        if trainable:  # continue training from the saved weights
            self.attach(model, config)
            with torch.no_grad():
                for name, value in tuned.items():
                    if name in params:
                        params[name].copy_(value)
            return model
        M.freeze_all(model)
        deltas, exact = {}, {}
        for name, value in tuned.items():
            if name not in params:
                continue  # buffers and keys the model recomputes
            base = params[name].detach()
            if value.shape != base.shape:
                raise ConfigError(f"full: {directory} has {name} of shape {tuple(value.shape)}, the base "
                                  f"{tuple(base.shape)}; load it on the base it was fine-tuned from")
            value = value.to(base.device, base.dtype)
            if not torch.equal(value, base):
                deltas[name], exact[name] = value - base, value
        M.attach_deltas(model, deltas, exact)
        model.adapterhub_full_config = config.to_dict()
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        model.__dict__.pop("adapterhub_full_config", None)
        return M.remove_overlays(model)

    def merge(self, model: nn.Module) -> None:
        M.merge_overlays(model, self.name)

    def unmerge(self, model: nn.Module) -> None:
        M.unmerge_overlays(model, self.name)


def _read_model_weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(p for p in directory.glob("*.safetensors") if p.name != M.WEIGHTS_FILE)
    if not files:
        raise NotFound(f"{directory} holds no model *.safetensors; is it a saved 'full' adapter?")
    state: dict[str, Any] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(FullMethod())
