"""Prompt tuning: a trained soft prompt prepended to the input embeddings (Lester et al., 2021).

PEFT's PromptTuning. Only ``num_virtual_tokens x hidden`` parameters train. Not mergeable; served
in mixed batches as a :class:`~adapterhub.serving_forms.SoftPromptForm` in front of each row's input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import adapterhub
from adapterhub import Capabilities, ConfigError, option
from adapterhub.config import MethodConfig
from adapterhub.plugins._peft import PromptLearningMethod, align_logits


@dataclasses.dataclass
class PromptConfig(MethodConfig):
    method_name = "prompt"

    num_virtual_tokens: int = option(16, "length of the soft prompt")
    init: str = option(
        "sample_vocab",
        "initial prompt: random vectors, embeddings of random vocabulary tokens, or of init_text",
        choices=("random", "sample_vocab", "text"),
    )
    init_text: str = option("", "text whose token embeddings start the prompt (with init=text)")

    def validate(self) -> None:
        if not 1 <= self.num_virtual_tokens <= 1024:
            raise ConfigError(
                f"{self.method_name} config: num_virtual_tokens={self.num_virtual_tokens} must be in 1..1024"
            )
        if self.init == "text" and not self.init_text.strip():
            raise ConfigError(f"{self.method_name} config: init=text needs --set init_text='Classify the sentiment'")


class PromptMethod(PromptLearningMethod):
    name = "prompt"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (80 steps): flip 0.81 (lr 3e-2: 0.72).
    virtual_tokens = "input"
    recommended_options = {"lr": 1e-1, "epochs": 4.0, "warmup_steps": 5}
    config_class = PromptConfig
    capabilities = Capabilities(mergeable=False, quantized_base=True, mixed_batch=True, composable=True)
    description = "Prompt tuning: a trained soft prompt at the input (PEFT PromptTuning)."
    peft_type = "PROMPT_TUNING"

    def attach(self, model: Any, config: PromptConfig) -> Any:
        from peft import get_peft_model

        # init=text tokenizes init_text with the base's own tokenizer, found where the base came from
        return align_logits(get_peft_model(model, self.peft_config(config, getattr(model, "name_or_path", None))))

    def peft_config(self, config: PromptConfig, tokenizer_path: str | None = None) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit

        extra: dict[str, Any] = {}
        if config.init == "text":
            if not tokenizer_path:
                raise ConfigError("prompt: init=text needs a base loaded from a directory or Hub id (for its tokenizer)")
            extra = {"prompt_tuning_init_text": config.init_text, "tokenizer_name_or_path": tokenizer_path}
        return PromptTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens,
            prompt_tuning_init={"random": PromptTuningInit.RANDOM, "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
                                "text": PromptTuningInit.TEXT}[config.init],
            task_type="CAUSAL_LM",
            **extra,
        )


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(PromptMethod())
