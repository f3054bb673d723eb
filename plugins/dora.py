"""DoRA: weight-decomposed LoRA (Liu et al., 2024), PEFT's ``use_dora``.

Each adapted weight is split into a magnitude vector and a direction that LoRA updates. Served in
mixed batches as a :class:`~adapterhub.serving_forms.DoraForm`: the LoRA part, and the magnitudes
the server divides by the row norms of ``W + BA`` once, when the adapter loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import adapterhub
from adapterhub import AdapterFiles, Capabilities, DataError
from adapterhub.plugins._peft import base_module_name
from adapterhub.plugins.lora import LoraConfig, LoraMethod, peft_lora_form
from adapterhub.serving_forms import DoraForm


@dataclasses.dataclass
class DoraConfig(LoraConfig):
    method_name = "dora"


class DoraMethod(LoraMethod):
    name = "dora"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 0.97.
    recommended_options = {"lr": 1e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = DoraConfig
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    foldable_bottom = False  # the magnitude rescales the whole output, a top's delta too, on the server
    description = "Weight-decomposed LoRA: a learned magnitude plus a LoRA-updated direction (PEFT use_dora)."
    peft_type = "LORA"
    peft_variant = "use_dora"

    def peft_config(self, config: DoraConfig, **extra: Any) -> Any:
        return super().peft_config(config, use_dora=True, **extra)

    def serving_form(self, files: AdapterFiles, base_config: Any) -> Any:
        if files.read_json("adapter_config.json").get("fan_in_fan_out"):
            # trained on GPT-2-style Conv1D layers: the per-row scale does not yet reproduce PEFT's
            # there (tests/test_architectures.py), so such adapters take the exclusive path, exactly
            return None
        views = files.tensor_views("adapter_model.safetensors")
        suffix = ".lora_magnitude_vector"
        magnitudes = {base_module_name(k[: -len(suffix)]): views[k] for k in views if k.endswith(suffix)}
        lora = peft_lora_form(files)
        if set(magnitudes) != set(lora.deltas):
            raise DataError(f"not a DoRA adapter: it has magnitude vectors for {len(magnitudes)} of "
                            f"{len(lora.deltas)} LoRA modules; publish it with the method it was trained with")
        return DoraForm(lora, magnitudes)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(DoraMethod())
