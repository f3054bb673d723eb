"""Scoring with a reward adapter offline: the base with its one-score head, the head file, the adapter.

A reward adapter (``--objective reward``) is three things: the base loaded with
``AutoModelForSequenceClassification`` (num_labels=1), the score head saved beside the adapter as
:data:`HEAD_FILE`, and the method's own adapter. :class:`RewardModel` puts them together and
scores each prompt + answer as TRL's ``RewardTrainer`` saw it in training: the chat template's
rendering of the prompt turns plus one assistant turn, padded on the right, read at the last
non-pad token. ``adapterhub score`` and ``grpo``'s ``reward=adapter:TASK@N`` both use it.

The head belongs to the objective, not the method: it is hidden while a method attaches or loads
(:func:`head_apart`), so every method, whatever it adapts, leaves it alone. The helpers here are
shared with the ``reward`` objective, so training and scoring cannot drift.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from adapterhub.adapters import adapter_metadata, load_adapter, resolve_adapter_dir
from adapterhub.base import load_base, resolve_device
from adapterhub.errors import ConfigError, IntegrityError, NotFound
from adapterhub.metadata import check_base
from adapterhub.objective import SEQUENCE_CLASSIFICATION

HEAD_FILE = "reward_head.safetensors"
HEAD_NAMES = ("score", "classifier")
"""Where ``AutoModelForSequenceClassification`` puts the head: ``score`` on decoder LMs (Llama,
Qwen, Mistral, GPT-2, GPT-NeoX, Phi...), ``classifier`` on some others."""


# -- the head ------------------------------------------------------------------------------------


def score_head(model: Any) -> tuple[str, Any]:
    """The head's name and module, under any adapter wrapper (a PEFT layer wrapping it: its base)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        module = getattr(inner, name, None)
        if module is not None and (hasattr(module, "weight") or hasattr(module, "base_layer")):
            return name, module.get_base_layer() if hasattr(module, "get_base_layer") else module
    raise ConfigError(f"{type(inner).__name__} has no score head (looked for {', '.join(HEAD_NAMES)}); a reward model "
                      "needs a base that AutoModelForSequenceClassification supports")


@contextlib.contextmanager
def head_apart(model: Any) -> Iterator[None]:
    """Hide the head while a method attaches or loads its adapter: the head is this objective's, so
    no method may adapt, train or save it (PEFT's ``all-linear`` would wrap it, ``full`` and
    ``freeze`` would count it among their weights and save it relative to its random start)."""
    name, _ = score_head(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = getattr(inner, name)
    setattr(inner, name, None)
    try:
        yield
    finally:
        setattr(inner, name, module)


def init_head(model: Any) -> None:
    """A fresh head drawn from the current (seeded) RNG, as transformers initialises one: the base
    loads before ``--seed`` is applied, so its random head would differ from run to run."""
    import torch

    _, module = score_head(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    with torch.no_grad():
        module.weight.normal_(0.0, getattr(config, "initializer_range", None) or 0.02)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


def head_tensors(model: Any) -> dict[str, Any]:
    """The head's parameters by file key (``score.weight``), detached copies on the CPU."""
    name, module = score_head(model)
    return {f"{name}.{key}": value.detach().to("cpu", copy=True).contiguous()
            for key, value in module.state_dict().items()}


def save_head(model: Any, directory: str | Path) -> Path:
    """Write the trained head to :data:`HEAD_FILE` (float32, safetensors)."""
    from safetensors.torch import save_file

    path = Path(directory) / HEAD_FILE
    save_file({k: v.float() for k, v in head_tensors(model).items()}, str(path), metadata={"format": "pt"})
    return path


def load_head(model: Any, directory: str | Path) -> None:
    """Copy :data:`HEAD_FILE` into the base's head, before the method's adapter loads on top."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise NotFound(f"{directory} has no {HEAD_FILE}; a reward adapter saves its score head there "
                       "(train one with `adapterhub train --objective reward ...`)")
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{path} is not a readable safetensors file ({exc})") from None
    name, module = score_head(model)
    params = {f"{name}.{key}": value for key, value in module.state_dict(keep_vars=True).items()}
    if set(saved) != set(params) or any(saved[k].shape != params[k].shape for k in params):
        shapes = {k: tuple(v.shape) for k, v in saved.items()}
        raise ConfigError(f"{path} holds {shapes}, not this base's head "
                          f"{ {k: tuple(v.shape) for k, v in params.items()} }; score on the base it was trained on")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(saved[key].to(param.device, param.dtype))


# -- the model -----------------------------------------------------------------------------------


def ready_for_methods(model: Any) -> Any:
    """Let every method attach to a sequence-classification model.

    PEFT wraps the base in ``PeftModelForCausalLM`` (our methods' task type), which keeps the base's
    ``prepare_inputs_for_generation`` and reads its ``generation_config``; a classifier has neither.
    A reward model never generates, so the first is a stub that says so.
    """
    from transformers import GenerationConfig

    def refuse_generation(*args: Any, **kwargs: Any) -> Any:
        raise ConfigError("a reward model scores answers and does not generate; score with `adapterhub score`")

    if not hasattr(model, "prepare_inputs_for_generation"):
        model.prepare_inputs_for_generation = refuse_generation
    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig()
    return model


def render(tokenizer: Any, prompt: list[dict[str, str]], completion: str) -> list[int]:
    """Token ids of prompt + answer, as TRL's RewardTrainer tokenizes a conversational pair."""
    turns = [*prompt, {"role": "assistant", "content": completion}]
    return list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"])


def rewards(model: Any, pad_id: int, sequences: list[list[int]], batch_size: int) -> list[float]:
    """One score per token sequence; batches of similar length, right-padded as in training."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores: list[float] = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, :len(sequences[i])] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(chunk):
            scores[i] = float(logits[row, 0].float())
    return scores


class RewardModel:
    """A published (or saved) reward adapter on its base, ready to score answers."""

    def __init__(self, model: Any, tokenizer: Any, reference: str, method: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.reference = reference
        self.method = method

    @classmethod
    def load(cls, adapter: str, *, registry: str | None = None, base: str | None = None, quantize: str = "none",
             device: str | None = None) -> "RewardModel":
        """``adapter``: ``task@N`` / ``task@tag`` or an adapter directory; ``base``: the base model
        directory (default: the one recorded in the adapter's ``adapterhub.json``)."""

        directory, resolved = resolve_adapter_dir(adapter, registry)
        reference = resolved or str(directory)
        meta = adapter_metadata(directory)
        objective = (meta.training.get("objective") or {}) if meta is not None else {}
        if objective.get("head") != SEQUENCE_CLASSIFICATION:
            trained = f"objective {objective.get('name', 'sft')!r}" if meta is not None else "a plain PEFT adapter"
            raise ConfigError(f"{reference} is not a reward model ({trained}: it generates answers, it has no score "
                              "head); train one with `adapterhub train --objective reward --data PAIRS.jsonl ...`")
        base_dir = base or meta.base_name
        if not base_dir:
            raise ConfigError(f"{reference} records no base model; pass the base directory (--base DIR)")
        dev = resolve_device(device)
        loaded = load_base(base_dir, quantize, device=dev, head=SEQUENCE_CLASSIFICATION)
        check_base(meta, loaded.fingerprint, where=reference, base_name=str(base_dir),
                   advice="pass the base it was trained on (--base DIR)")
        model = ready_for_methods(loaded.model)
        load_head(model, directory)
        with head_apart(model):
            method, model = load_adapter(model, directory)
        model.config.get_text_config().pad_token_id = loaded.tokenizer.pad_token_id  # as TRL's trainer sets it
        model.eval()
        return cls(model, loaded.tokenizer, reference, method)

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str], *,
              batch_size: int = 16) -> list[float]:
        """The reward of each completion as the answer to its prompt (a list of chat turns)."""
        if len(prompts) != len(completions):
            raise ConfigError(f"score: {len(prompts)} prompts but {len(completions)} completions; give one each")
        if batch_size < 1:
            raise ConfigError(f"score: batch_size={batch_size} must be >= 1")
        sequences = [render(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        return rewards(self.model, self.tokenizer.pad_token_id, sequences, batch_size)

    def __repr__(self) -> str:
        return f"<RewardModel {self.reference} ({self.method.name})>"
