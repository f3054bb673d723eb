"""``distill``: a student adapter learns a teacher's next-token distributions (TRL's DistillationTrainer).

On-policy distillation (Agarwal et al., "GKD"): for every prompt the STUDENT samples an answer
(transformers ``generate`` at ``temperature``), the teacher reads the same tokens, and the student
moves towards the teacher's distribution at every answer position. Learning on its own samples
is the point: the student is corrected where its own answers go, not only on a fixed dataset.
``beta`` picks the divergence of TRL's generalised JSD: 0 forward KL(teacher || student), the
default (mass-covering: the student learns everything the teacher would say), 1 reverse KL
(mode-seeking), 0.5 the symmetric JSD. TRL's stable trainer has no off-policy mode, so answers in
the data file are ignored; GKD's ``lmbda`` mix of dataset and sampled answers lives in
``trl.experimental`` and is not offered here.

The teacher, ``--objective-set teacher=...``:

- ``TASK@N`` / ``TASK@tag`` or an adapter directory, trained on THIS base (the fingerprint is
  checked): a second, frozen copy of the base with that adapter, so one more copy of the base in
  memory. A mergeable adapter (LoRA, IA3, ...) on a full-precision base is merged into its copy and
  the teacher runs as fast as the base.
- ``model:DIR`` (or ``model:HUB_ID``): any causal LM whose tokenizer has exactly the student's
  vocabulary (the divergence compares the two distributions token by token), e.g. a larger model
  of the same family. Its weights must be safetensors; the lineage records its fingerprint.

Prompts are never truncated: prompt plus ``max_completion_length`` must fit ``--max-length``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub.adapters import adapter_metadata, method_for_directory, resolve_adapter_dir
from adapterhub.base import fingerprint, load_base, resolve_base_dir
from adapterhub.chat import render_prompt
from adapterhub.config import option
from adapterhub.errors import AdapterHubError, ConfigError, DataError
from adapterhub.generation import greedy_tokens
from adapterhub.metadata import check_base
from adapterhub.objective import Objective, ObjectiveConfig, TrainingJob
from adapterhub.stacking import bottoms_of, fold_bottoms
from adapterhub.objectives import shapes
from adapterhub.objectives.trl_run import last_logged, run_trl

MODEL_PREFIX = "model:"
TEACHER_HELP = "a registry reference TASK@N, an adapter directory trained on this base, or model:DIR for a full model"
DIVERGENCES = {0.0: "forward KL(teacher || student)", 0.5: "JSD", 1.0: "reverse KL(student || teacher)"}


@dataclasses.dataclass
class DistillConfig(ObjectiveConfig):
    method_name = "distill"

    teacher: str = option("", f"what the student imitates (required): {TEACHER_HELP}")
    beta: float = option(0.0, "the divergence: 0 forward KL (teacher || student), 1 reverse KL, 0.5 JSD, "
                              "in between a generalised JSD")
    temperature: float = option(1.0, "softens both distributions in the loss and the student's sampling")
    max_completion_length: int = option(32, "tokens the student samples per answer at most")

    def validate(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"distill config: beta={self.beta} must be in [0, 1] (0 forward KL, 1 reverse KL)")
        if not self.temperature > 0:
            raise ConfigError(f"distill config: temperature={self.temperature} must be > 0, e.g. 1.0")
        if self.max_completion_length < 1:
            raise ConfigError(f"distill config: max_completion_length={self.max_completion_length} must be >= 1")


# -- the teacher ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Teacher:
    """A resolved ``teacher=`` value: where it is and what the lineage records."""

    spec: str
    kind: str
    """``adapter`` (a copy of the base with it) or ``model`` (a model directory of its own)."""
    directory: Path
    ref: str | None = None
    """The registry's exact ``task@N`` for a reference; None for a directory."""
    meta: Any = None
    """The adapter's ``adapterhub.json`` (None: a plain PEFT directory, or a model)."""
    bottoms: list = dataclasses.field(default_factory=list)
    """The versions a teacher trained ``--on`` them needs below it, deepest first (see stacking)."""
    registry: Any = None

    def lineage(self) -> dict[str, Any]:
        if self.kind == "model":
            return {"kind": "model", "model": self.spec[len(MODEL_PREFIX):], "directory": str(self.directory),
                    "fingerprint": fingerprint(self.directory)}
        where = {"ref": self.ref} if self.ref else {"directory": str(self.directory)}
        meta = self.meta
        return {"kind": "adapter", **where, "method": meta.method if meta else None,
                "base_fingerprint": meta.base_fingerprint if meta else None,
                **({"on": [m.ref for m in self.bottoms]} if self.bottoms else {})}


def resolve_teacher(spec: str, registry: str | None = None) -> Teacher:
    """Find what ``teacher=`` names, without loading any weights; ``ConfigError`` says what to give."""

    spec = (spec or "").strip()
    if not spec:
        raise ConfigError(f"distill needs a teacher: --objective-set teacher=SPEC, where SPEC is {TEACHER_HELP}")
    if spec.startswith(MODEL_PREFIX):
        name = spec[len(MODEL_PREFIX):].strip()
        if not name:
            raise ConfigError("teacher=model: names no model; e.g. teacher=model:/models/smollm2-360m-instruct")
        try:
            return Teacher(spec, "model", resolve_base_dir(name))
        except AdapterHubError as exc:
            raise ConfigError(f"teacher={spec}: {exc}") from None
    try:
        directory, ref = resolve_adapter_dir(spec, registry)
        meta = adapter_metadata(directory)
    except AdapterHubError as exc:
        hint = ""
        if (Path(spec) / "config.json").is_file():
            hint = f"; for a full model write teacher={MODEL_PREFIX}{spec}"
        raise ConfigError(f"teacher={spec}: {exc}{hint} (a teacher is {TEACHER_HELP})") from None
    try:  # a teacher trained on top of others is the model with them below it, checked before any load
        bottoms = bottoms_of(meta, ref or spec, registry)
    except AdapterHubError as exc:
        raise ConfigError(f"teacher={spec}: {exc}") from None
    return Teacher(spec, "adapter", directory, ref, meta, bottoms, registry)


def uses_virtual_tokens(model: Any) -> bool:
    """Prefix / prompt / P-tuning: TRL's loss calls the backbone directly and would skip them."""
    return any(getattr(c, "is_prompt_learning", False) for c in (getattr(model, "peft_config", None) or {}).values())


def load_teacher(teacher: Teacher, base: Any) -> Any:
    """The teacher as a frozen causal LM beside the student's ``base`` (a :class:`BaseModel`)."""
    if teacher.kind == "model":
        model = load_model_teacher(teacher, base)
    else:
        model = load_adapter_teacher(teacher, base)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_adapter_teacher(teacher: Teacher, base: Any) -> Any:
    if teacher.meta is not None:
        check_base(teacher.meta, base.fingerprint, where=f"teacher={teacher.spec}", base_name=base.name,
                   advice=f"a teacher adapter must be trained on the student's base; for another model write "
                          f"teacher={MODEL_PREFIX}DIR")
    method = method_for_directory(teacher.directory, meta=teacher.meta)
    copy = load_base(base.directory, base.quantize, dtype=base.dtype)
    fold_bottoms(copy, teacher.bottoms, teacher.registry)
    model = method.load(copy.model, teacher.directory)
    if uses_virtual_tokens(model):
        raise ConfigError(f"teacher={teacher.spec} is a {method.name!r} adapter, which adds virtual tokens; TRL's "
                          "distillation reads the teacher's backbone directly and would skip them. Use a teacher "
                          "trained with a weight-based method (lora, ia3, adapter, ...)")
    if method.capabilities.mergeable and base.quantize == "none":
        method.merge(model)
        model = method.detach(model)
    return model


def load_model_teacher(teacher: Teacher, base: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    check_vocabulary(teacher, base)
    try:
        return AutoModelForCausalLM.from_pretrained(teacher.directory, dtype=getattr(torch, base.dtype),
                                                    use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"teacher={teacher.spec}: cannot load {teacher.directory} as a causal LM "
                          f"with safetensors weights ({exc})") from None


def check_vocabulary(teacher: Teacher, base: Any) -> None:
    """The same token for the same id in both models, and the same number of output logits."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(teacher.directory).get_vocab()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"teacher={teacher.spec}: no tokenizer in {teacher.directory} ({exc}); distillation "
                          "needs it to check the teacher shares the student's vocabulary") from None
    ours = base.tokenizer.get_vocab()
    if theirs != ours:
        differ = sorted(t for t in set(theirs) | set(ours) if theirs.get(t) != ours.get(t))
        raise ConfigError(
            f"teacher={teacher.spec}: its tokenizer ({teacher.directory}, {len(theirs)} tokens) is not the "
            f"student base's ({base.directory}, {len(ours)} tokens): {len(differ)} tokens differ, e.g. "
            f"{', '.join(map(repr, differ[:3]))}. Distillation compares the two next-token distributions token "
            "by token; use a teacher of the same model family (same tokenizer) or an adapter on this base")
    teacher_logits = AutoConfig.from_pretrained(teacher.directory).get_text_config().vocab_size
    student_logits = base.model.config.get_text_config().vocab_size
    if teacher_logits != student_logits:
        raise ConfigError(f"teacher={teacher.spec}: vocab_size {teacher_logits} in {teacher.directory}, but "
                          f"{student_logits} in the student base {base.directory}; the output layers must match")


# -- the objective -------------------------------------------------------------------------------


def distillation_arguments(**values: Any) -> Any:
    """TRL's ``DistillationConfig``. It has no ``max_length`` (every objective gets ours): the answer
    is bounded by ``max_completion_length`` and :func:`check_prompt_lengths` checks the prompt."""
    from trl import DistillationConfig

    values.pop("max_length", None)
    return DistillationConfig(**values)


def check_prompt_lengths(job: TrainingJob, config: DistillConfig) -> None:
    budget = job.options.max_length - config.max_completion_length
    tokenizer = job.base.tokenizer
    for index, row in enumerate(job.rows + (job.eval_rows or [])):
        n = len(tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"])
        if n > budget:
            raise DataError(f"{job.data}: example {index + 1} has a prompt of {n} tokens; with "
                            f"max_completion_length={config.max_completion_length} it passes --max-length "
                            f"{job.options.max_length}. Raise --max-length or shorten the prompt")


def divergence_name(beta: float) -> str:
    return DIVERGENCES.get(beta, f"generalised JSD (beta={beta})")


class Distill(Objective):
    name = "distill"
    description = ("Distillation: the adapter learns a teacher's next-token distributions on its own sampled "
                   "answers (TRL's DistillationTrainer; teacher = an adapter on this base or model:DIR).")
    data_shape = "{" + shapes.PROMPT_KEYS + "} (answers, if any, are ignored: the student samples its own)"
    config_class = DistillConfig

    def __init__(self) -> None:
        self._teachers: dict[int, dict[str, Any]] = {}  # per job: what lineage() records

    def check_method(self, method: Any) -> None:
        if method.virtual_tokens:
            raise ConfigError(f"distill: method {method.name!r} adds virtual tokens, which TRL's distillation loss "
                              "skips (it reads the backbone directly); use a weight-based method (lora, ia3, adapter, ...)")

    def check(self, config: ObjectiveConfig, *, registry: str | None = None) -> None:
        resolve_teacher(config.teacher, registry)  # type: ignore[attr-defined]

    def read_data(self, path: str | Path) -> list[Any]:
        return [{"prompt": row["prompt"]} for row in shapes.read_prompts(path)]

    def train(self, job: TrainingJob) -> Any:
        from trl import DistillationTrainer

        config: DistillConfig = job.config  # type: ignore[assignment]
        check_prompt_lengths(job, config)
        teacher = resolve_teacher(config.teacher, job.registry)
        model = job.trainable()
        if uses_virtual_tokens(model):
            raise ConfigError(f"distill: method {job.method.name!r} adds virtual tokens, which TRL's distillation "
                              "loss skips (it reads the backbone directly); use a weight-based method "
                              "(lora, ia3, adapter, ...)")
        teacher_model = load_teacher(teacher, job.base)
        self._teachers[id(job)] = teacher.lineage()
        args = {"beta": config.beta, "temperature": config.temperature,
                "max_completion_length": config.max_completion_length}
        result = run_trl(job, DistillationTrainer, distillation_arguments, model=model, args=args,
                         teacher_model=teacher_model)
        losses = [entry["loss"] for entry in result.history if "loss" in entry]
        if losses:
            result.metrics.update({"divergence_first_logged": losses[0], "divergence_last_logged": losses[-1]})
        result.metrics.update(last_logged(result.history, "completions/mean_length"))
        return result

    def lineage(self, job: TrainingJob) -> dict[str, Any]:
        return {"teacher": self._teachers.pop(id(job), {"spec": job.config.teacher}),  # type: ignore[attr-defined]
                "divergence": divergence_name(job.config.beta),  # type: ignore[attr-defined]
                "sampling": "on-policy: the student's own answers (transformers generate)"}


# -- measuring -----------------------------------------------------------------------------------


def teacher_kl(teacher: Any, student: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
               max_new_tokens: int = 32) -> float:
    """Mean per-token KL(teacher || student) along the teacher's greedy answers to ``conversations``.

    The teacher's own answers are a fixed path, so a student measured before and after training is
    compared on the same tokens; 0 means the student predicts every answer token as the teacher does.
    """
    import torch


    prompts = [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    answers = greedy_tokens(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            ids = torch.tensor([prompt + answer])
            span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the positions that predict the answer
            teacher_logp = log_probs(teacher, ids)[span]
            student_logp = log_probs(student, ids)[span]
            total += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
            tokens += len(answer)
    return total / max(1, tokens)


def log_probs(model: Any, ids: Any) -> Any:
    import torch

    device = next(model.parameters()).device
    return torch.log_softmax(model(input_ids=ids.to(device)).logits[0].float(), -1).cpu()


@adapterhub.hookimpl
def adapterhub_register_objectives(register: Any) -> None:
    register(Distill())
