"""The glue every TRL-based objective shares.

Rows become a ``datasets.Dataset`` in TRL's conversational format; our training options become
the TRL config (a ``TrainingArguments`` subclass, so every option maps as it does for SFT); the
method's adapter is attached by the job; the trainer runs through
:func:`adapterhub.training.run_trainer`, so the method's optimizer groups (LoRA+) and callbacks
(AdaLoRA's budget), checkpoints, resuming and early stopping work for every objective alike.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from adapterhub.mixture import eval_sets
from adapterhub.objective import TrainingJob
from adapterhub.training import TrainResult, run_trainer


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    """Rows as a Dataset with every column any row has (None where a row lacks it), as
    ``load_dataset("json")`` reads a file: ``Dataset.from_list`` takes its columns from the first
    row alone and silently drops a column that only later rows carry (a GRPO reward's ``answer``)."""
    from datasets import Dataset

    columns = dict.fromkeys(key for row in rows for key in row)
    return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def run_trl(
    job: TrainingJob,
    trainer_class: Any,
    args_class: Any,
    *,
    args: dict[str, Any] | None = None,
    model: Any = None,
    train_dataset: Any = None,
    after_init: Callable[[Any], None] | None = None,
    **trainer_kwargs: Any,
) -> TrainResult:
    """Train ``model`` (default: the job's trainable adapter model) with a TRL trainer.

    ``after_init(trainer)`` runs once the trainer is built (to drop TRL's reference-adapter copy,
    say); ``trainer_kwargs`` go to the trainer (``teacher_model``, ``reward_funcs``, ...).
    """
    model = model if model is not None else job.trainable()
    has_eval = bool(job.eval_rows)
    train_dataset = train_dataset if train_dataset is not None else to_dataset(job.rows)
    eval_dataset = to_dataset(job.eval_rows) if has_eval else None
    if has_eval and job.eval_tasks:  # a multi-task run: each task's eval set too, prepared by the trainer
        eval_dataset = eval_sets(eval_dataset, {name: to_dataset(rows) for name, rows in job.eval_tasks.items()})

    def make_trainer(training_args: Any, optimizer: Any, callbacks: list[Any]) -> Any:
        with quiet_trl_warnings(), trainable_dtypes_kept(model):
            trainer = trainer_class(
                model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=job.base.tokenizer, callbacks=callbacks, optimizers=(optimizer, None),
                **trainer_kwargs,
            )
        if after_init is not None:
            after_init(trainer)
        return trainer

    defaults = {"max_length": job.options.max_length, "disable_dropout": True}
    return run_trainer(job.method, model, job.method_config, job.options, make_trainer, has_eval=has_eval,
                       callbacks=job.callbacks, args_class=args_class, args={**defaults, **(args or {})})


def base_as_reference(trainer: Any) -> None:
    """TRL keeps a copy of a PEFT model's starting adapter as its reference; without it the
    reference is the base with the adapter disabled, as the objective documents."""
    model = trainer.model
    if is_peft(model) and "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")


@contextlib.contextmanager
def trainable_dtypes_kept(model: Any) -> Any:
    """TRL's trainers cast a quantized model's trainable weights to bfloat16 when they are built
    (QLoRA's recipe); here every trainable weight stays in the dtype ``run_trainer`` gave it (float32),
    as under the SFT Trainer: a bottleneck adapter or a reward head computes in its weights' dtype and
    would meet float32 inputs, and small updates vanish in bfloat16."""
    kept = {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in kept and param.dtype != kept[name]:
            param.data = param.data.to(kept[name])


@contextlib.contextmanager
def quiet_trl_warnings() -> Any:
    """TRL warns at every trainer start that our prebuilt optimizer skips its own; nothing to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.*", category=UserWarning)
        yield


def last_logged(history: list[dict[str, Any]], *keys: str) -> dict[str, float]:
    """The last value the trainer logged for each of ``keys`` (training metrics worth keeping)."""
    found: dict[str, float] = {}
    for entry in history:
        for key in keys:
            if key in entry:
                found[key] = entry[key]
    return found
