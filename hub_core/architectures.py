"""What adapterhub needs to know about a decoder architecture, read from its modules, not its config.

Config field names differ between architectures (GPT-2 has ``n_embd`` and no
``intermediate_size``), so questions such as "can bitsandbytes quantize this?" are answered by
walking the model's own layers, built on the meta device when no weights are loaded yet.
"""

from __future__ import annotations

from typing import Any, Iterator

from .errors import BaseModelError

BNB_BLOCK = 64  # bitsandbytes 4-bit blocks: every weight row length must be a multiple of this


def linear_layers(model: Any) -> Iterator[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every Linear-like layer (``nn.Linear`` and GPT-2's
    ``Conv1D``, whose weight is stored transposed)."""
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            rows, cols = module.weight.shape  # Conv1D keeps [in, out]
            yield name, rows, cols


def meta_model(config: Any) -> Any:
    """The model for ``config`` with no storage behind its weights (cheap to build, any size)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def output_layer_names(model: Any) -> set[str]:
    """Names of the output head(s), which bitsandbytes leaves unquantized."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def check_quantizable(model_or_config: Any) -> None:
    """Refuse shapes bitsandbytes 4-bit cannot handle on the CPU, naming the first such layer.

    Takes a loaded model or a config (then the model is built on the meta device).
    """
    model = model_or_config if hasattr(model_or_config, "named_modules") else meta_model(model_or_config)
    skipped = output_layer_names(model)
    for name, in_features, _ in linear_layers(model):
        if name in skipped:
            continue
        if in_features % BNB_BLOCK:
            raise BaseModelError(
                f"cannot quantize to 4 bit: layer {name} has rows of {in_features} values, not a multiple of "
                f"{BNB_BLOCK}; use a base whose dimensions are multiples of {BNB_BLOCK}, or --quantize none"
            )
