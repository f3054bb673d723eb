"""Shared plumbing for methods that PEFT implements (LoRA and relatives, IA3, prompt learning).

A PEFT-backed method supplies only ``peft_config(config)``; attaching, saving in PEFT's own format,
loading with ``PeftModel.from_pretrained``, and tracked merge/unmerge live here once.
:class:`PromptLearningMethod` adds what the prompt-learning family (prefix, prompt, P-tuning)
needs: no merging, and logits that line up with ``input_ids`` like every other method's.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from adapterhub.errors import ConfigError, MergeError
from adapterhub.method import Method
from adapterhub.serving_forms import LoraDeltas, LoraForm, SoftPromptForm


def is_quantized(model: Any) -> bool:
    """True for a bitsandbytes 4- or 8-bit base (merging into it would be lossy)."""
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "is_quantized", False))


def refuse_quantized(method: Method, model: Any) -> None:
    """``quantized_base``, enforced: a method that does not declare it refuses to attach or load on a
    bitsandbytes 4-/8-bit base with a clear error, instead of failing (or not) somewhere inside."""
    if is_quantized(model) and not method.capabilities.quantized_base:
        raise ConfigError(
            f"method {method.name!r} cannot train or load on a quantized base (it declares quantized_base=False); "
            "load the base with --quantize none, or pick a method that declares it (adapterhub plugins)"
        )


def tuner_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class PeftMethod(Method):
    """A method stored in PEFT's format and run by PEFT's tuner classes."""

    def peft_config(self, config: Any) -> Any:
        """The ``peft.PeftConfig`` for our config dataclass."""
        raise NotImplementedError

    def attach(self, model: Any, config: Any) -> Any:
        from peft import get_peft_model

        refuse_quantized(self, model)
        return get_peft_model(model, self.peft_config(config))

    def save(self, model: Any, directory: str | Path) -> None:
        model.save_pretrained(str(directory), safe_serialization=True)

    def load(self, model: Any, directory: str | Path, *, trainable: bool = False) -> Any:
        from peft import PeftModel

        refuse_quantized(self, model)
        return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)

    def detach(self, model: Any) -> Any:
        if is_prompt_learning(model):  # nothing was injected into the base: it is just wrapped
            return model.get_base_model()
        return model.unload()

    def merge(self, model: Any) -> None:
        if not self.capabilities.mergeable:
            Method.merge(self, model)  # raises NotMergeable naming the method
        if is_quantized(model):
            raise MergeError(
                f"{self.name}: refusing to merge into a quantized base (rounding the merged weights back "
                "to 4/8 bit loses the adapter); run `adapterhub merge REF --base DIR --out DIR`, which "
                "merges into the full-precision base, or serve the adapter unmerged"
            )
        layers = tuner_layers(model)
        if any(layer.merged for layer in layers):
            raise MergeError(f"{self.name}: the adapter is already merged; unmerge it first")
        try:
            model.base_model.merge_adapter(safe_merge=True)
        except ValueError as exc:  # PEFT's safe_merge found NaN/inf
            raise MergeError(f"{self.name}: refusing to merge, the result is not finite ({exc})") from None

    def unmerge(self, model: Any) -> None:
        if not self.capabilities.mergeable:
            Method.unmerge(self, model)
        if not any(layer.merged for layer in tuner_layers(model)):
            raise MergeError(f"{self.name}: nothing to unmerge; the adapter is not merged")
        model.base_model.unmerge_adapter()


def is_prompt_learning(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


class PromptLearningMethod(PeftMethod):
    """Prefix / prompt / P-tuning: virtual tokens instead of weight changes, so never mergeable.

    PEFT's soft-prompt models return logits for the virtual tokens too (``[B, n + T, V]``); a
    forward hook drops them so that logits have the shape of ``input_ids`` whatever the method.
    The loss is computed inside the base model before the hook runs, so training is unaffected.
    """

    def serving_form(self, files: Any, base_config: Any) -> Any:
        """The saved virtual-token embeddings (for P-tuning PEFT saves the encoder's output), served
        in front of each row's input embeddings."""

        views = files.tensor_views("adapter_model.safetensors")
        if "prompt_embeddings" not in views:
            raise KeyError("adapter_model.safetensors has no prompt_embeddings tensor")
        return SoftPromptForm(views["prompt_embeddings"])

    def attach(self, model: Any, config: Any) -> Any:
        return cached_generation_keeps_prompt(align_logits(super().attach(model, config)))

    def load(self, model: Any, directory: str | Path, *, trainable: bool = False) -> Any:
        return cached_generation_keeps_prompt(align_logits(super().load(model, directory, trainable=trainable)))

    def detach(self, model: Any) -> Any:
        base = super().detach(model)
        # PEFT's generate leaves our renaming wrapper on the base as its own prepare step
        if getattr(base.__dict__.get("prepare_inputs_for_generation"), "adapterhub_renames_cache", False):
            del base.prepare_inputs_for_generation
        return base


def cached_generation_keeps_prompt(model: Any) -> Any:
    """Make ``generate`` with a key/value cache keep the virtual tokens (peft <= 0.21 on transformers 5).

    PEFT's ``prepare_inputs_for_generation`` looks for the cache under ``past_key_values`` in what
    the base model's own step returns; transformers 5 names it ``cache``. So PEFT takes every step
    for the first: a prefix goes in beside an empty cache that the model uses instead (the prefix is
    dropped: the base's answer), and a soft prompt is prepended again at every step (drift after
    one token). Renaming the key for PEFT, and back for the model, gives the forward's tokens.
    Upstream: peft ``src/peft/peft_model.py``, ``PeftModelForCausalLM.prepare_inputs_for_generation``.
    """
    base_step, peft_step = model.base_model_prepare_inputs_for_generation, model.prepare_inputs_for_generation

    def base_inputs_as_peft_expects(*args: Any, **kwargs: Any) -> dict:
        inputs = base_step(*args, **kwargs)
        if inputs.get("use_cache") is False:  # the cache PEFT made for a prefix comes back filled: not ours to reuse
            inputs.pop("cache", None)
        elif "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def peft_inputs_as_the_model_expects(*args: Any, **kwargs: Any) -> dict:
        inputs = peft_step(*args, **kwargs)
        if renamed and "past_key_values" in inputs and "cache" not in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    renamed = "cache" in inspect.signature(model.get_base_model().forward).parameters
    base_inputs_as_peft_expects.adapterhub_renames_cache = True  # type: ignore[attr-defined]
    model.base_model_prepare_inputs_for_generation = base_inputs_as_peft_expects
    model.prepare_inputs_for_generation = peft_inputs_as_the_model_expects
    return model


def align_logits(model: Any) -> Any:
    """Make a soft-prompt PeftModel return logits for the input positions only."""
    def drop_virtual_tokens(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        logits = getattr(output, "logits", None)
        if tokens is not None and logits is not None and logits.shape[1] > tokens.shape[1]:
            output.logits = logits[:, logits.shape[1] - tokens.shape[1]:]
        return output

    model.register_forward_hook(drop_virtual_tokens, with_kwargs=True)
    return model


def lora_form_from_state(state: Mapping[str, torch.Tensor], scaling: Callable[[str], float]):
    """A :class:`LoraForm` from a PEFT LoRA state dict (``...q_proj.lora_A.weight`` keys).

    ``scaling(module)`` is a base module's alpha/r factor, left to the server's slot write (its
    transposing copy multiplies on the way, so B is not read and written once more here). A and B
    keep the file's layout and dtype: the write converts too. The state is only indexed here, not
    read: over a file's tensor views, the slot write reads the bytes in place (:class:`LoraDeltas`).
    """

    keys, scales = {}, {}
    for key in state:
        if ".lora_A." in key:
            module = base_module_name(key.split(".lora_A.")[0])
            keys[module] = (key, key.replace(".lora_A.", ".lora_B."))
            scales[module] = float(scaling(module))
    return LoraForm(deltas=LoraDeltas(state, keys), scales=scales)


def base_module_name(peft_key: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj``."""
    prefix = "base_model.model."
    return peft_key[len(prefix):] if peft_key.startswith(prefix) else peft_key
