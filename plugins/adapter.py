"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020): ``h + up(act(down(h)))``.

Our own small module, added after a decoder layer's attention output projection and MLP output
projection (Houlsby) or after the MLP only (Pfeiffer) through forward hooks, so the base modules
stay untouched and ``detach`` removes everything. Which modules those are (``o_proj`` and
``down_proj`` on Llama, ``attn.c_proj`` and ``mlp.c_proj`` on GPT-2) is read from the base's module
tree by :func:`adapterhub.architectures.block_layout` unless the config names them; the saved
config names them. The up-projection starts at zero: an untrained adapter is the identity.
Adapters are fp32 modules after the base layers, so a bitsandbytes 4-bit base trains them as well
as a full-precision one. Nonlinear, hence not mergeable; served in mixed batches through
:class:`~adapterhub.serving_forms.BottleneckForm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapterhub
from adapterhub import Capabilities, ConfigError, MethodConfig, option
from adapterhub.architectures import block_layout, model_type
from adapterhub.plugins import _modules as M
from adapterhub.plugins._peft import is_quantized
from adapterhub.serving_forms import BottleneckForm

CHILD = "bottleneck"
AUTO = "auto"  # module name resolved from the base's architecture (adapterhub.architectures.block_layout)
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    method_name = "adapter"

    variant: str = option("houlsby", "houlsby: after attention and MLP; pfeiffer: after the MLP only",
                          choices=("houlsby", "pfeiffer"))
    reduction: int = option(16, "bottleneck size = hidden size / reduction (ignored when bottleneck_size > 0)")
    bottleneck_size: int = option(0, "bottleneck width; 0: hidden size / reduction")
    activation: str = option("relu", "nonlinearity between down- and up-projection", choices=ACTIVATIONS)
    attn_output_module: str = option(
        AUTO, "name (inside a decoder layer) of the attention output projection; auto: found from the base "
        "(self_attn.o_proj on Llama, attn.c_proj on GPT-2, attention.dense on GPT-NeoX)")
    mlp_output_module: str = option(
        AUTO, "name (inside a decoder layer) of the MLP output projection; auto: found from the base "
        "(mlp.down_proj on Llama, mlp.c_proj on GPT-2, mlp.dense_4h_to_h on GPT-NeoX)")

    def validate(self) -> None:
        if self.reduction < 1:
            raise ConfigError(f"adapter config: reduction={self.reduction} must be >= 1, e.g. --set reduction=16")
        if self.bottleneck_size < 0:
            raise ConfigError(f"adapter config: bottleneck_size={self.bottleneck_size} must be >= 0 (0: use reduction)")

    def targets(self) -> list[str]:
        return [self.mlp_output_module] if self.variant == "pfeiffer" else [self.attn_output_module, self.mlp_output_module]

    def resolved(self, model: nn.Module) -> "AdapterConfig":
        """This config with ``auto`` module names replaced by the base architecture's own."""
        wanted = ["mlp_output_module"] + ([] if self.variant == "pfeiffer" else ["attn_output_module"])
        if all(getattr(self, key) != AUTO for key in wanted):
            return self

        layout = block_layout(model)
        found = {"attn_output_module": ("attention", layout.attention_output),
                 "mlp_output_module": ("MLP", layout.mlp_output)}
        names = {}
        for key in wanted:
            what, name = found[key]
            if getattr(self, key) != AUTO:
                continue
            if name is None:
                raise ConfigError(f"adapter config: cannot tell the {what} output projection of this "
                                  f"{model_type(model) or 'model'}'s decoder layers; "
                                  f"set {key}=NAME (its name inside a layer)")
            names[key] = name
        return dataclasses.replace(self, **names)

    def width(self, hidden: int) -> int:
        return self.bottleneck_size or max(1, hidden // self.reduction)


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))`` in its weights' dtype (float32; a trainer may cast them), applied to
    its owner's output by a forward hook."""

    def __init__(self, owner: nn.Module, width: int, activation: str):
        super().__init__()
        hidden = M.out_features(owner)
        device = owner.weight.device
        self.activation = activation
        self.down = nn.Linear(hidden, width, device=device, dtype=torch.float32)
        self.up = nn.Linear(width, hidden, device=device, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        owner.add_module(CHILD, self)
        self.handle = owner.register_forward_hook(lambda _m, _a, out: self(out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        act = getattr(F, self.activation)
        return h + self.up(act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def bottlenecks(model: nn.Module) -> list[tuple[str, nn.Module, Bottleneck]]:
    return [(n, m, b) for n, m in model.named_modules() if isinstance(b := getattr(m, CHILD, None), Bottleneck)]


@contextlib.contextmanager
def trainable_on_quantized(model: nn.Module) -> Iterator[None]:
    """Let the Trainer train adapters on a bitsandbytes base.

    transformers refuses "purely quantized" models unless its own PEFT-integration marker is set;
    our hooks are exactly such trainable adapters, so the marker is set for the run and cleared.
    """
    flag = "_hf_peft_config_loaded"
    if not is_quantized(model) or getattr(model, flag, False):
        yield
        return
    setattr(model, flag, True)
    try:
        yield
    finally:
        setattr(model, flag, False)


class AdapterMethod(adapterhub.Method):
    name = "adapter"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 1.00.
    recommended_options = {"lr": 2e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = AdapterConfig
    capabilities = Capabilities(mergeable=False, quantized_base=True, mixed_batch=True, composable=True)
    description = "Bottleneck adapters after attention and/or MLP outputs (Houlsby / Pfeiffer)."

    def attach(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        if bottlenecks(model):
            raise ConfigError("adapter: the model already carries a bottleneck adapter; detach it first")
        config = config.resolved(model)  # saved with the names it found, so the file says where it sits
        targets = M.decoder_linears(model, config.targets())
        if not targets:
            raise ConfigError(f"adapter config: no decoder-layer module named {config.targets()}; set "
                              "attn_output_module / mlp_output_module to this architecture's names")
        M.freeze_all(model)
        for _, owner in targets:
            Bottleneck(owner, config.width(M.out_features(owner)), config.activation)
        model.adapterhub_adapter_config = config.to_dict()
        return model

    def training_context(self, model: nn.Module) -> Any:
        return trainable_on_quantized(model)

    def save(self, model: nn.Module, directory: str | Path) -> None:
        found = bottlenecks(model)
        if not found:
            raise ConfigError("adapter: this model carries no bottleneck adapter to save")
        tensors = {f"{n}.{CHILD}.{k}": v for n, _, b in found for k, v in b.state_dict().items()}
        M.write_adapter(directory, "bottleneck", getattr(model, "adapterhub_adapter_config", {}), tensors)

    def load(self, model: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
        config = self.make_config(M.read_config(directory, "bottleneck"))
        tensors = M.read_tensors(directory)
        self.attach(model, config)
        for name, _, b in bottlenecks(model):
            prefix = f"{name}.{CHILD}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                b.load_state_dict(own)
            except RuntimeError as exc:
                self.detach(model)
                raise ConfigError(f"adapter: {directory} does not fit this base at {name} ({exc}); "
                                  "load it on the base it was trained on") from None
            b.requires_grad_(trainable)
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        for _, owner, b in bottlenecks(model):
            b.handle.remove()
            delattr(owner, CHILD)
        model.__dict__.pop("adapterhub_adapter_config", None)
        return model

    def serving_form(self, files: adapterhub.AdapterFiles, base_config: Any) -> Any:
        config = self.make_config(M.read_config(files, "bottleneck"))
        tensors = files.read_tensors()
        suffix = f".{CHILD}.down.weight"
        layers = {}
        for key in sorted(k for k in tensors if k.endswith(suffix)):
            module = key[: -len(suffix)]
            p = f"{module}.{CHILD}."
            layers[module] = tuple(tensors[p + k].float() for k in ("down.weight", "down.bias", "up.weight", "up.bias"))
        return BottleneckForm(activation=config.activation, layers=layers)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(AdapterMethod())
