"""LoHa as an adapterhub method: a complete third-party plugin in one small module.

LoHa (Hyeon-Woo et al., 2022) writes the weight update as the Hadamard product of two low-rank
products, ``(B1 A1) * (B2 A2)``; PEFT implements it. This plugin uses only adapterhub's public API
(``adapterhub.Method``, ``MethodConfig``, ``option``, ``hookimpl``) and PEFT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub import Capabilities, ConfigError, MergeError, MethodConfig, option


@dataclasses.dataclass
class LohaConfig(MethodConfig):
    method_name = "loha"

    r: int = option(8, "rank of each of the two low-rank factors")
    alpha: float = option(8.0, "scaling numerator: the update is scaled by alpha / r")
    target_modules: list[str] = option(["q_proj", "v_proj"], "names of the Linear modules to adapt")

    def validate(self) -> None:
        if not 1 <= self.r <= 1024:
            raise ConfigError(f"loha config: r={self.r} must be between 1 and 1024, e.g. --set r=8")
        if self.alpha <= 0:
            raise ConfigError(f"loha config: alpha={self.alpha} must be positive")


class LohaMethod(adapterhub.Method):
    name = "loha"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 0.88.
    recommended_options = {"lr": 5e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = LohaConfig
    capabilities = Capabilities(mergeable=True, quantized_base=False, mixed_batch=False, composable=False)
    description = "Low-rank Hadamard product adaptation (PEFT LoHa); an example third-party plugin."
    peft_type = "LOHA"

    def attach(self, model: Any, config: LohaConfig) -> Any:
        from peft import LoHaConfig, get_peft_model

        refuse_quantized(model)
        peft_config = LoHaConfig(r=config.r, alpha=config.alpha, target_modules=list(config.target_modules),
                                 task_type="CAUSAL_LM")
        return get_peft_model(model, peft_config)

    def save(self, model: Any, directory: str | Path) -> None:
        model.save_pretrained(str(directory), safe_serialization=True)

    def load(self, model: Any, directory: str | Path, *, trainable: bool = False) -> Any:
        from peft import PeftModel

        refuse_quantized(model)
        return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)

    def detach(self, model: Any) -> Any:
        return model.unload()

    def merge(self, model: Any) -> None:
        try:
            model.base_model.merge_adapter(safe_merge=True)
        except ValueError as exc:
            raise MergeError(f"loha: refusing to merge, the result is not finite ({exc})") from None

    def unmerge(self, model: Any) -> None:
        model.base_model.unmerge_adapter()


def refuse_quantized(model: Any) -> None:
    """What ``quantized_base=False`` promises: a clear refusal of a 4-/8-bit base (PEFT's LoHa has no
    bitsandbytes layers and would fail on one with a shape error); the contract tests check it."""
    if any(getattr(model, flag, False) for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit")):
        raise ConfigError("loha cannot train or load on a quantized base; load the base with --quantize none")


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(LohaMethod())
