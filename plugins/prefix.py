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
from adapterhub.plugins._peft import PromptLearningMethod, is_quantized
from adapterhub.serving_forms import PrefixForm


@dataclasses.dataclass
class PrefixConfig(MethodConfig):
    method_name = "prefix"

    num_virtual_tokens: int = option(16, "length of the key/value prefix in every layer")
    prefix_projection: bool = option(False, "train the prefix through a 2-layer MLP (saved as its output)")
    encoder_hidden_size: int = option(0, "hidden size of that MLP (0: the model's key/value width)")
    init: str = option(
        "activations",
        "initial prefix: the base's own keys/values for init_text (Li & Liang 2021, 7.2), or PEFT's random "
        "table (used anyway with prefix_projection or a bitsandbytes base)",
        choices=("activations", "random"),
    )
    init_text: str = option(
        "Read the input carefully and answer it.", "text whose keys/values start the prefix (repeated/cut to length)"
    )

    def validate(self) -> None:
        if not 1 <= self.num_virtual_tokens <= 1024:
            raise ConfigError(
                f"prefix config: num_virtual_tokens={self.num_virtual_tokens} must be in 1..1024, "
                "e.g. --set num_virtual_tokens=16"
            )
        if self.encoder_hidden_size < 0:
            raise ConfigError(f"prefix config: encoder_hidden_size={self.encoder_hidden_size} must be >= 0")
        if self.init not in ("activations", "random"):
            raise ConfigError(f"prefix config: init={self.init!r} must be 'activations' or 'random', e.g. --set init=random")
        if self.init == "activations" and not self.init_text.strip():
            raise ConfigError("prefix config: init=activations needs a non-empty init_text, e.g. --set init_text='Answer:'")


class PrefixMethod(PromptLearningMethod):
    name = "prefix"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (80 steps), prefix from the base's activations (init's default): sentiment 1.00, flip
    # 1.00; newlabels (answers in made-up words, 240 examples, 120 steps) 1.00 held-out. From PEFT's
    # random prefix: 0.86, 0.98 and newlabels 0.52 (README, "Prompt learning").
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

    def attach(self, model: Any, config: PrefixConfig) -> Any:
        model = super().attach(model, config)
        # with prefix_projection the table is the MLP's input, not keys/values: it stays random. So it
        # does on a bitsandbytes base: a forward there before training leaves the prefix without
        # gradients (bitsandbytes 4-bit, transformers 5.25; test_method_contract's quantized_base check)
        if config.init == "activations" and not config.prefix_projection and not is_quantized(model):
            init_from_activations(model, config.init_text)
        return model

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


def init_from_activations(model: Any, text: str) -> None:
    """Start the prefix as the frozen base's keys/values for ``text`` (Li & Liang 2021, section 7.2).

    PEFT's random table (std 1) is far from real keys/values: prefix tuning then starts with a huge
    loss and can fail to learn answers in new words. ``text`` is tokenized with the base's own
    tokenizer (found where the base came from), repeated or cut to ``num_virtual_tokens``, and run
    through the base alone; each token's row is written in PEFT's layout (:func:`prefix_form`).
    """
    import torch

    from adapterhub.base import load_tokenizer

    source = getattr(model.get_base_model(), "name_or_path", None)
    if not source:
        raise ConfigError("prefix: init=activations needs a base loaded from a directory or Hub id (for its "
                          "tokenizer); pass --set init=random for a base built in memory")
    ids = load_tokenizer(source)(text, add_special_tokens=False)["input_ids"]
    cfg = model.active_peft_config
    tokens = (ids * (cfg.num_virtual_tokens // len(ids) + 1))[: cfg.num_virtual_tokens]
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    backbone = model.get_base_model().base_model  # the decoder stack alone: no head (a reward model's
    with torch.no_grad():                           # score is PEFT-wrapped mid-attach) and no logits to pay for
        out = backbone(input_ids=torch.tensor([tokens], device=weight.device), use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5 renamed it
        rows = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # each [1, H, T, D]
        table = torch.stack(rows, dim=0)[:, 0].permute(2, 0, 1, 3)  # [T, 2L, H, D]
        weight.copy_(table.reshape(weight.shape).to(weight.dtype))


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
