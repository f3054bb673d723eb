"""DoRA: weight-decomposed LoRA (Liu et al., 2024), PEFT's ``use_dora``.

Each adapted weight is split into a magnitude vector and a direction that LoRA updates. The
column-norm of ``W + BA`` makes the change full-rank, so it has no low-rank serving form: DoRA
adapters are served one at a time (or merged).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub import Capabilities
from adapterhub.plugins.lora import LoraConfig, LoraMethod


@dataclasses.dataclass
class DoraConfig(LoraConfig):
    method_name = "dora"


class DoraMethod(LoraMethod):
    name = "dora"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 0.97.
    recommended_options = {"lr": 1e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = DoraConfig
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=False, composable=False)
    description = "Weight-decomposed LoRA: a learned magnitude plus a LoRA-updated direction (PEFT use_dora)."
    peft_type = "LORA"

    def peft_config(self, config: DoraConfig, **extra: Any) -> Any:
        return super().peft_config(config, use_dora=True, **extra)

    def serving_form(self, directory: str | Path, base_config: Any) -> Any:
        return None  # the magnitude normalisation is not a low-rank delta


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(DoraMethod())
