"""LoRA: a trainable low-rank update ``B @ A`` beside frozen Linear layers (Hu et al., 2021).

Implemented by PEFT; stored in PEFT's format so plain ``PeftModel.from_pretrained`` loads it.
Served in mixed batches through :class:`~adapterhub.serving_forms.LoraForm`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import adapterhub
from adapterhub import AdapterFiles, Capabilities, ConfigError, MethodConfig, option
from adapterhub.plugins._peft import PeftMethod, lora_form_from_state


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    method_name = "lora"

    r: int = option(8, "rank of the update matrices")
    alpha: float = option(16.0, "scaling numerator: the update is scaled by alpha / r")
    dropout: float = option(0.0, "dropout on the LoRA input during training")
    target_modules: list[str] = option(["all-linear"], "module names to adapt ('all-linear': every Linear but the head)")
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)")
    bias: str = option("none", "which biases to train", choices=("none", "all", "lora_only"))

    def validate(self) -> None:
        if self.r < 1 or self.r > 4096:
            raise ConfigError(f"lora config: r={self.r} must be between 1 and 4096, e.g. --set r=16")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"lora config: alpha={self.alpha} must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora config: dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("lora config: target_modules is empty; e.g. --set target_modules=q_proj,v_proj")


class LoraMethod(PeftMethod):
    name = "lora"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 0.94.
    recommended_options = {"lr": 1e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = LoraConfig
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    description = "Low-rank adaptation of Linear layers (PEFT LoRA)."
    foldable_bottom = True  # its change adds to the layer's output: merged under a top, as the server composes it
    peft_type = "LORA"

    def peft_config(self, config: LoraConfig, **extra: Any) -> Any:
        from peft import LoraConfig as PeftLoraConfig

        targets = config.target_modules
        return PeftLoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets[0] if targets == ["all-linear"] else list(targets),
            use_rslora=config.rslora,
            bias=config.bias,
            task_type="CAUSAL_LM",
            **extra,
        )

    def serving_form(self, files: AdapterFiles, base_config: Any) -> Any:
        return peft_lora_form(files)


def peft_lora_form(files: AdapterFiles) -> Any:
    """The LoraForm of a PEFT LoRA adapter, scaling folded in (shared by LoRA relatives)."""
    cfg = files.read_json("adapter_config.json")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    root = math.sqrt if cfg.get("use_rslora") else (lambda rank: rank)

    def scaling(module: str) -> float:
        if not rank_pattern and not alpha_pattern:  # the usual case, asked for 42 modules per load
            return alpha / root(r)
        mr = next((v for k, v in rank_pattern.items() if module.endswith(k)), r)
        ma = next((v for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
        return ma / root(mr)

    return lora_form_from_state(files.tensor_views("adapter_model.safetensors"), scaling)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(LoraMethod())
