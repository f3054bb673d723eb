"""LoRA+: LoRA with a larger learning rate for B than for A (Hayou et al., 2024).

Only training differs from LoRA (two optimizer groups), so the adapter is a plain PEFT LoRA
adapter: it loads, merges and serves exactly like one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import adapterhub
from adapterhub import Capabilities, ConfigError, option
from adapterhub.plugins.lora import LoraConfig, LoraMethod


@dataclasses.dataclass
class LoraPlusConfig(LoraConfig):
    method_name = "loraplus"

    loraplus_lr_ratio: float = option(16.0, "learning rate of the B matrices = ratio * lr (A and the rest train at lr)")

    def validate(self) -> None:
        super().validate()
        if not self.loraplus_lr_ratio >= 1.0:
            raise ConfigError(
                f"loraplus config: loraplus_lr_ratio={self.loraplus_lr_ratio} must be >= 1 "
                "(1 is plain LoRA; the paper uses 16), e.g. --set loraplus_lr_ratio=16"
            )


class LoraPlusMethod(LoraMethod):
    name = "loraplus"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 1.00 (B trains at 16x: 6.4e-3).
    recommended_options = {"lr": 4e-4, "epochs": 3.0, "warmup_steps": 5}
    config_class = LoraPlusConfig
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    description = "LoRA with a separate, larger learning rate for the B matrices (LoRA+)."
    peft_type = "LORA"

    def optimizer_groups(self, model: Any, config: LoraPlusConfig, options: Any) -> list[dict[str, Any]]:
        b_params, other = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (b_params if "lora_B" in name or "lora_embedding_B" in name else other).append(param)
        return [
            {"params": other, "lr": options.lr},
            {"params": b_params, "lr": options.lr * config.loraplus_lr_ratio},
        ]


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(LoraPlusMethod())
