"""What adapterhub needs to know about a decoder architecture, read from its modules, not its config.

Config field names differ between architectures (GPT-2 has ``n_embd`` and no
``intermediate_size``, no ``num_key_value_heads``), and so do module names (``model.layers.0.mlp.
down_proj``, ``transformer.h.0.mlp.c_proj``, ``gpt_neox.layers.0.mlp.dense_4h_to_h``). So every
question is answered from the model's own module tree (built on the meta device when no weights
are loaded yet):

- which layers are Linear-like (``nn.Linear``, bitsandbytes' subclasses, GPT-2's ``Conv1D``);
- where the decoder layers are (:func:`decoder_layers`);
- which module inside a decoder layer ends its attention and its MLP (:func:`block_layout`), where
  bottleneck adapters go and IA3 scales;
- default target modules: PEFT's own per-architecture tables where they have the architecture
  (:func:`ia3_defaults`), else the block layout.

:data:`LAYOUTS` is the one table keyed by ``model_type``: it overrides the module-tree rules for an
architecture whose tree misleads them. It is empty while no tested architecture needs it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator

from .errors import BaseModelError, ConfigError

BNB_BLOCK = 64  # bitsandbytes 4-bit blocks: every weight row length must be a multiple of this


# -- layers ----------------------------------------------------------------------------------------


def linear_shape(module: Any) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a Linear-like layer, None for anything else.

    Linear-like: ``nn.Linear`` (bitsandbytes' 4/8-bit layers subclass it) and transformers'
    ``Conv1D`` (GPT-2 and relatives), which stores its weight transposed, ``[in, out]``.
    """
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


def linear_layers(model: Any) -> Iterator[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every Linear-like layer of ``model``."""
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None:
            yield name, *shape


def meta_model(config: Any) -> Any:
    """The model for ``config`` with no storage behind its weights (cheap to build, any size)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def model_type(model: Any) -> str:
    """The config's ``model_type`` (``llama``, ``gpt2``...), or "" when the model has no config."""
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def hidden_width(model: Any) -> int:
    """Width of the residual stream: the input embeddings' vector size."""
    embeddings = model.get_input_embeddings()
    width = getattr(embeddings, "embedding_dim", None)
    return int(width if width is not None else embeddings.weight.shape[-1])


def decoder_layers(model: Any) -> list[tuple[str, Any]]:
    """``(name, layer)`` of the decoder layers in order (``model.layers.3``, ``transformer.h.3``...).

    They are the children of a ``ModuleList`` of blocks of one class that hold Linear-like layers;
    where several lists qualify (a vision tower, MoE experts inside each layer), the one with as
    many blocks as the config's ``num_hidden_layers`` is preferred, then the one holding the most
    parameters. Raises :class:`ConfigError` for a model that has none.
    """
    import torch.nn as nn

    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(linear_shape(m) is not None for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((len(module) == expected, size, name, module))
    if not candidates:
        raise ConfigError(
            f"cannot find the decoder layers of this {model_type(model) or type(model).__name__} model "
            "(no ModuleList of blocks with Linear layers); adapterhub supports decoder-only transformers"
        )
    _, _, name, layers = max(candidates, key=lambda c: (c[0], c[1]))
    return [(f"{name}.{i}" if name else str(i), layer) for i, layer in enumerate(layers)]


def layer_index_of(model: Any) -> Callable[[str], int | None]:
    """A function from a parameter or module name to its decoder layer's index (None outside layers).

    Built from :func:`decoder_layers`, so it knows ``transformer.h.3.attn.c_attn.weight`` as well
    as ``model.layers.3.self_attn.q_proj.weight``.
    """
    prefixes = {name: i for i, (name, _) in enumerate(decoder_layers(model))}

    def index(name: str) -> int | None:
        parts = name.split(".")
        for end, part in enumerate(parts, 1):
            if part.isdigit() and (found := prefixes.get(".".join(parts[:end]))) is not None:
                return found
        return None

    return index


# -- block layout ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Module names inside ONE decoder layer (``self_attn.o_proj``, ``mlp.c_proj``...)."""

    attention_output: str | None
    """The attention's output projection: writes the attention result back to the residual stream."""
    mlp_output: str | None
    """The MLP's output projection (``down_proj``, ``c_proj``, ``dense_4h_to_h``, ``fc2``)."""
    attention_inputs: tuple[str, ...] = ()
    """The attention's other Linear layers (``q_proj``/``k_proj``/``v_proj``, fused ``c_attn``/``qkv_proj``)."""


LAYOUTS: dict[str, BlockLayout] = {}
"""``model_type`` -> its layout, for architectures whose module tree misleads :func:`block_layout`'s
rules. The only place that names architectures; add an entry (and a case to the test matrix)
rather than a branch anywhere else."""

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_IN_LIST = re.compile(r"(^|\.)\d+(\.|$)")  # inside a nested ModuleList (MoE experts): not the block's own


def block_layout(model: Any) -> BlockLayout:
    """Where a decoder layer's attention and MLP end, by :data:`LAYOUTS` or by the module tree.

    Rules: among the first decoder layer's children, one whose name says attention (``attn``,
    ``attention``) holds the attention; every other child holding Linear layers is MLP (or is an
    MLP Linear itself, as OPT's ``fc2``). The output projection of each is its LAST Linear
    (in registration order) whose output width is the residual stream's.
    """
    known = LAYOUTS.get(model_type(model))
    if known is not None:
        return known
    _, layer = decoder_layers(model)[0]
    hidden = hidden_width(model)
    attention: list[tuple[str, tuple[int, int]]] = []
    mlp: list[tuple[str, tuple[int, int]]] = []
    for child_name, child in layer.named_children():
        for local, module in child.named_modules():
            shape = linear_shape(module)
            if shape is None or _IN_LIST.search(local):
                continue
            name = f"{child_name}.{local}" if local else child_name
            (attention if _ATTENTION.search(child_name) else mlp).append((name, shape))

    def output(found: list[tuple[str, tuple[int, int]]]) -> str | None:
        return next((name for name, (_, out) in reversed(found) if out == hidden), None)

    attention_output = output(attention)
    return BlockLayout(
        attention_output=attention_output,
        mlp_output=output(mlp),
        attention_inputs=tuple(name for name, _ in attention if name != attention_output),
    )


# -- default targets -------------------------------------------------------------------------------


def ia3_defaults(model: Any) -> tuple[list[str], list[str]]:
    """IA3's default ``(target_modules, feedforward_modules)`` for this model's architecture.

    PEFT's own tables where they have the architecture (``k_proj, v_proj, down_proj`` on Llama,
    ``c_attn, mlp.c_proj`` on GPT-2); else the block layout: the attention's input projections
    (scaled on their outputs) and the MLP output projection (scaled on its input).
    """
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    kind = model_type(model)
    if kind in TARGETS and kind in FEEDFORWARD:
        return list(TARGETS[kind]), list(FEEDFORWARD[kind])
    layout = block_layout(model)
    if layout.mlp_output is None or not layout.attention_inputs:
        raise ConfigError(
            f"ia3: PEFT has no default target modules for {kind or 'this'} models and the decoder layers' "
            "attention and MLP projections could not be told apart; set target_modules and feedforward_modules"
        )
    return [*layout.attention_inputs, layout.mlp_output], [layout.mlp_output]


# -- quantization ----------------------------------------------------------------------------------


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
