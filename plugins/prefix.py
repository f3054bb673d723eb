"""Prefix tuning: trained key/value vectors prepended to every attention layer (Li & Liang, 2021).

PEFT's PrefixTuning. With ``prefix_projection`` the prefix is produced by a small MLP during
training (more stable); PEFT saves the MLP's *output*, so a saved adapter is always the plain
per-layer key/value table and serving needs no MLP. Not mergeable: a prefix is extra attention
context, not a weight change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub import AdapterFiles, Capabilities, ConfigError, option
from adapterhub.config import MethodConfig
from adapterhub.plugins._peft import PromptLearningMethod
from adapterhub.serving_forms import PrefixForm


@dataclasses.dataclass
class PrefixConfig(MethodConfig):
    method_name = "prefix"

    num_virtual_tokens: int = option(16, "length of the key/value prefix in every layer")
    prefix_projection: bool = option(False, "train the prefix through a 2-layer MLP (saved as its output)")
    encoder_hidden_size: int = option(0, "hidden size of that MLP (0: the model's key/value width)")

    def validate(self) -> None:
        if not 1 <= self.num_virtual_tokens <= 1024:
            raise ConfigError(
                f"prefix config: num_virtual_tokens={self.num_virtual_tokens} must be in 1..1024, "
                "e.g. --set num_virtual_tokens=16"
            )
        if self.encoder_hidden_size < 0:
            raise ConfigError(f"prefix config: encoder_hidden_size={self.encoder_hidden_size} must be >= 0")


class PrefixMethod(PromptLearningMethod):
    name = "prefix"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (80 steps): flip 0.97 (lr 1e-2: 0.69). Not enough for answers in words the base never
    # says: newlabels (240 examples, 120 steps) 0.52 held-out, 0.70 on its own training prompts; lr
    # 1e-1 diverges, prefix_projection learns slower (README, "Prompt learning").
    virtual_tokens = "prefix"
    recommended_options = {"lr": 3e-2, "epochs": 4.0, "warmup_steps": 5}
    config_class = PrefixConfig
    capabilities = Capabilities(mergeable=False, quantized_base=True, mixed_batch=True, composable=True)
    description = "Prefix tuning: trained per-layer attention keys/values (PEFT PrefixTuning)."
    peft_type = "PREFIX_TUNING"

    def peft_config(self, config: PrefixConfig) -> Any:
        from peft import PrefixTuningConfig

        extra = {"encoder_hidden_size": config.encoder_hidden_size} if config.encoder_hidden_size else {}
        return PrefixTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=config.prefix_projection,
            task_type="CAUSAL_LM",
            **extra,
        )

    def load(self, model: Any, directory: str | Path, *, trainable: bool = False) -> Any:
        cfg = json.loads((Path(directory) / "adapter_config.json").read_text())
        if trainable and cfg.get("prefix_projection"):
            raise ConfigError(
                f"prefix adapter {directory} was trained with prefix_projection, and PEFT saves only the "
                "projected prefix, not the MLP; it cannot be trained further. Train a new adapter instead"
            )
        return super().load(model, directory, trainable=trainable)

    def serving_form(self, files: AdapterFiles, base_config: Any) -> Any:
        return prefix_form(files)


def prefix_form(files: AdapterFiles) -> Any:
    """Keys/values ``[layers, kv_heads, tokens, head_dim]`` from PEFT's saved prompt embeddings.

    PEFT lays one token's prefix out as ``[layers * 2, kv_heads, head_dim]`` (key and value of
    layer ``l`` at rows ``2l`` and ``2l + 1``); ``token_dim`` and ``num_attention_heads`` in its
    config already count key/value heads (grouped-query attention).
    """

    cfg = files.read_json("adapter_config.json")
    table = files.read_tensors()["prompt_embeddings"].float()
    tokens, layers, heads = cfg["num_virtual_tokens"], cfg["num_layers"], cfg["num_attention_heads"]
    head_dim = cfg["token_dim"] // heads
    kv = table.view(tokens, layers * 2, heads, head_dim).permute(1, 2, 0, 3)  # [2L, H, T, D]
    return PrefixForm(keys=kv[0::2].contiguous(), values=kv[1::2].contiguous())


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(PrefixMethod())
