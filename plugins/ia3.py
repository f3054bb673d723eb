"""(IA)^3: learned vectors that rescale activations (Liu et al., 2022), PEFT's IA3.

A feed-forward module scales its *input* (``base(x * s)``), any other targeted module its *output*
(``base(x) * s``); PEFT stores the vector as ``[1, in]`` for the first kind and ``[out, 1]`` for
the second, which is how :func:`ia3_form` tells them apart. Merging multiplies the weight rows or
columns, so unmerge divides them back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub import Capabilities, ConfigError, MethodConfig, option
from adapterhub.plugins._peft import PeftMethod, base_module_name


@dataclasses.dataclass
class IA3Config(MethodConfig):
    method_name = "ia3"

    target_modules: list[str] = option(
        ["k_proj", "v_proj", "down_proj"], "modules whose activations are rescaled (PEFT's Llama default)"
    )
    feedforward_modules: list[str] = option(
        ["down_proj"], "targeted modules scaled on their input instead of their output (a subset of target_modules)"
    )

    def validate(self) -> None:
        if not self.target_modules:
            raise ConfigError("ia3 config: target_modules is empty; e.g. --set target_modules=k_proj,v_proj,down_proj")
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra and self.target_modules != ["all-linear"]:
            raise ConfigError(
                f"ia3 config: feedforward_modules {extra} are not in target_modules {self.target_modules}; "
                "add them to target_modules or drop them"
            )


class IA3Method(PeftMethod):
    name = "ia3"
    config_class = IA3Config
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    description = "(IA)^3: learned per-channel scales of attention keys/values and feed-forward inputs (PEFT IA3)."
    peft_type = "IA3"

    def peft_config(self, config: IA3Config) -> Any:
        from peft import IA3Config as PeftIA3Config

        targets = config.target_modules
        return PeftIA3Config(
            target_modules=targets[0] if targets == ["all-linear"] else list(targets),
            feedforward_modules=list(config.feedforward_modules),
            task_type="CAUSAL_LM",
        )

    def serving_form(self, directory: str | Path, base_config: Any) -> Any:
        return ia3_form(directory)


def ia3_form(directory: str | Path) -> Any:
    from safetensors.torch import load_file

    from adapterhub.serving_forms import ScaleForm

    state = load_file(str(Path(directory) / "adapter_model.safetensors"))
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
