"""(IA)^3: learned vectors that rescale activations (Liu et al., 2022), PEFT's IA3.

A feed-forward module scales its *input* (``base(x * s)``), any other targeted module its *output*
(``base(x) * s``); PEFT stores the vector as ``[1, in]`` for the first kind and ``[out, 1]`` for
the second, which is how :func:`ia3_form` tells them apart. Merging multiplies the weight rows or
columns, so unmerge divides them back. The default modules are PEFT's own for the base's
architecture, found when the adapter is attached (:func:`adapterhub.architectures.ia3_defaults`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import adapterhub
from adapterhub import AdapterFiles, Capabilities, ConfigError, MethodConfig, option
from adapterhub.architectures import ia3_defaults
from adapterhub.plugins._peft import PeftMethod, base_module_name
from adapterhub.serving_forms import ScaleForm

AUTO = "auto"  # resolved from the base's architecture (adapterhub.architectures.ia3_defaults)


@dataclasses.dataclass
class IA3Config(MethodConfig):
    method_name = "ia3"

    target_modules: list[str] = option(
        [AUTO], "modules whose activations are rescaled; auto: PEFT's default for the base's architecture "
        "(k_proj,v_proj,down_proj on Llama; c_attn,mlp.c_proj on GPT-2), else its attention input projections "
        "and MLP output projection"
    )
    feedforward_modules: list[str] = option(
        [AUTO], "targeted modules scaled on their input instead of their output (a subset of target_modules); "
        "auto: the architecture's MLP output projection(s) among target_modules"
    )

    def validate(self) -> None:
        if not self.target_modules:
            raise ConfigError("ia3 config: target_modules is empty; e.g. --set target_modules=k_proj,v_proj,down_proj")
        for key in ("target_modules", "feedforward_modules"):
            names = getattr(self, key)
            if AUTO in names and names != [AUTO]:
                raise ConfigError(f"ia3 config: {key}={names} mixes 'auto' with module names; pass one or the other")
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules) - {AUTO})
        if extra and self.target_modules not in (["all-linear"], [AUTO]):
            raise ConfigError(
                f"ia3 config: feedforward_modules {extra} are not in target_modules {self.target_modules}; "
                "add them to target_modules or drop them"
            )


class IA3Method(PeftMethod):
    name = "ia3"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 1.00 (scales start at 1 and move slowly: a large lr).
    recommended_options = {"lr": 2e-2, "epochs": 3.0, "warmup_steps": 5}
    config_class = IA3Config
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    description = "(IA)^3: learned per-channel scales of attention keys/values and feed-forward inputs (PEFT IA3)."
    peft_type = "IA3"

    def attach(self, model: Any, config: IA3Config) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(config, model))

    def peft_config(self, config: IA3Config, model: Any = None) -> Any:
        """PEFT's config; ``auto`` names are resolved against ``model`` (without one, left to PEFT's
        own per-architecture default, which knows fewer architectures)."""
        from peft import IA3Config as PeftIA3Config

        targets, feedforward = resolve_modules(config, model)
        return PeftIA3Config(
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            feedforward_modules=feedforward,
            task_type="CAUSAL_LM",
        )

    def serving_form(self, files: AdapterFiles, base_config: Any) -> Any:
        return ia3_form(files)


def resolve_modules(config: IA3Config, model: Any = None) -> tuple[list[str] | None, list[str] | None]:
    """``(target_modules, feedforward_modules)`` for PEFT, ``auto`` replaced by the architecture's."""
    if model is None:  # None: PEFT looks its own table up by model_type
        return (None if config.target_modules == [AUTO] else list(config.target_modules),
                None if config.feedforward_modules == [AUTO] else list(config.feedforward_modules))

    default_targets, default_feedforward = ia3_defaults(model)
    targets = default_targets if config.target_modules == [AUTO] else list(config.target_modules)
    if config.feedforward_modules != [AUTO]:
        return targets, list(config.feedforward_modules)
    if targets == ["all-linear"]:
        return targets, default_feedforward
    return targets, [m for m in default_feedforward if m in targets]


def ia3_form(files: AdapterFiles) -> Any:
    state = files.read_tensors()
    inputs, outputs = {}, {}
    for key, vector in state.items():
        if not key.endswith(".ia3_l") and ".ia3_l." not in key:
            continue
        module = base_module_name(key.split(".ia3_l")[0])
        if vector.shape[0] == 1 and vector.dim() == 2:  # [1, in]: feed-forward, scales the input
            inputs[module] = vector.float().flatten().contiguous()
        else:  # [out, 1]: scales the output
            outputs[module] = vector.float().flatten().contiguous()
    return ScaleForm(output_scales=outputs, input_scales=inputs)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(IA3Method())
