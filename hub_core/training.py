"""Training glue: our options mapped onto the Hugging Face Trainer.

The Trainer owns the loop, so ``accelerate launch`` / ``torchrun`` give data parallelism, and
checkpointing, early stopping, TensorBoard and progress bars come from transformers itself. This
module only translates :class:`TrainOptions`, builds optimizer groups (LoRA+ ratios, layer-wise
learning-rate decay) and collects metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architectures import decoder_layers, layer_index_of
from .config import _coerce, option
from .data import CausalCollator
from .mixture import eval_sets, evaluate_tasks, split_task_sets
from .errors import ConfigError

if TYPE_CHECKING:
    import torch.nn as nn

    from .method import Method

log = logging.getLogger(__name__)

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
# Options a method may recommend (how it learns: LoRA trains at 1e-3, full fine-tuning at 5e-5), so
# `train --help` says their default comes from the method instead of quoting the general one.
METHOD_RECOMMENDED = ("lr", "epochs", "warmup_steps", "scheduler", "weight_decay", "max_grad_norm")


@dataclasses.dataclass
class TrainOptions:
    """Training options; every field is a CLI flag (``--max-steps``) and a YAML key (``max_steps``)."""

    max_steps: int = option(-1, "stop after this many optimizer steps (-1: run --epochs)")
    epochs: float = option(3.0, "passes over the training data (when max_steps is -1)")
    lr: float = option(2e-4, "peak learning rate")
    batch_size: int = option(8, "examples per device per step")
    grad_accum: int = option(1, "gradient accumulation steps")
    seed: int = option(42, "random seed (data order, adapter init)")
    scheduler: str = option("linear", "learning-rate schedule", choices=SCHEDULERS)
    warmup_steps: int = option(0, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    max_length: int = option(512, "truncate examples to this many tokens")
    eval_split: float = option(0.0, "fraction of --data held out for evaluation (0: none)")
    eval_data: str | None = option(None, "separate JSONL file for evaluation")
    eval_steps: int = option(0, "evaluate every N steps (0: once per epoch when there is eval data)")
    early_stopping_patience: int = option(0, "stop after N evaluations without eval-loss improvement (0: off)")
    early_stopping_threshold: float = option(0.0, "minimum eval-loss improvement that counts")
    layerwise_lr_decay: float = option(1.0, "lr multiplier per layer below the top (1.0: off)")
    gradient_checkpointing: bool = option(False, "recompute activations to save memory")
    save_steps: int = option(0, "write a resumable Trainer checkpoint every N steps (0: off)")
    resume_from_checkpoint: str | None = option(None, "Trainer checkpoint dir to resume (or 'last')")
    tensorboard: bool = option(False, "write TensorBoard logs under the run directory")
    logging_steps: int = option(10, "log loss every N steps")
    progress: bool = option(True, "show a progress bar")
    threads: int = option(1, "torch CPU threads (1 measured fastest on 2 cores, alone and beside a busy neighbour: "
                             "bench/results/train_threads.json; raise it on a quiet machine with many cores)")
    run_dir: str | None = option(None, "directory for checkpoints and logs (default: a temp dir)")

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a positive number, e.g. 2e-4"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "must be >= 1 (or -1 to run --epochs)"),
            ("epochs", self.epochs > 0 and math.isfinite(self.epochs), "must be > 0"),
            ("eval_split", 0.0 <= self.eval_split < 1.0, "must be in [0, 1), e.g. 0.1"),
            ("eval_steps", self.eval_steps >= 0, "must be >= 0"),
            ("layerwise_lr_decay", 0.0 < self.layerwise_lr_decay <= 1.0, "must be in (0, 1], e.g. 0.9"),
            ("max_grad_norm", self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm), "must be >= 0"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("save_steps", self.save_steps >= 0, "must be >= 0"),
            ("logging_steps", self.logging_steps >= 1, "must be >= 1"),
            ("threads", self.threads >= 1, "must be >= 1"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "must be >= 0"),
            ("early_stopping_threshold", self.early_stopping_threshold >= 0, "must be >= 0"),
            ("scheduler", self.scheduler in SCHEDULERS, f"must be one of {', '.join(SCHEDULERS)}"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(f"training option {name}={getattr(self, name)!r} {message} ({_where(name)})")
        if self.eval_split and self.eval_data:
            raise ConfigError("training options eval_split and eval_data are exclusive; pass only one of them")
        has_eval = bool(self.eval_split or self.eval_data)
        if self.early_stopping_patience and not has_eval:
            raise ConfigError("early stopping needs eval data: add --eval-split 0.1 or --eval-data FILE")
        if self.eval_steps and not has_eval:
            raise ConfigError(f"eval_steps={self.eval_steps} needs eval data: add --eval-split 0.1 or --eval-data FILE")
        if self.resume_from_checkpoint == "last" and not self.run_dir:
            raise ConfigError(
                "resume_from_checkpoint='last' looks in the run directory; pass the --run-dir of the earlier run "
                "(or the checkpoint directory itself)"
            )

    @classmethod
    def for_method(cls, method: "Method", values: dict[str, Any], objective: Any = None) -> "TrainOptions":
        """Options from the user's ``values`` over the objective's and the method's recommended ones."""
        recommended = dict(getattr(objective, "recommended_options", {}))
        scale = getattr(objective, "lr_scale", None)
        if scale is not None and "lr" not in recommended:
            recommended["lr"] = method.recommended_options.get("lr", cls.lr) * scale
        return cls.from_dict({**method.recommended_options, **recommended, **values})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainOptions":
        """Options from YAML / flag values (strings coerced to each field's type); unknown keys are errors."""
        import typing

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(known))}"
            )
        hints = typing.get_type_hints(cls)
        coerced = {}
        for key, value in values.items():
            try:
                coerced[key] = _coerce("train", key, value, hints[key])
            except ConfigError:
                raise ConfigError(
                    f"training option {key}={value!r} is not a valid {_type_label(hints[key])} ({_where(key)})"
                ) from None
        return cls(**coerced)


def _where(name: str) -> str:
    return f"flag --{name.replace('_', '-')}, YAML key '{name}:'"


def _type_label(tp: Any) -> str:
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    tp = args[0] if args else tp
    return getattr(tp, "__name__", str(tp))


@dataclasses.dataclass
class TrainResult:
    """What a training run produced: the trained model and its metrics."""

    model: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


# -- optimizer ---------------------------------------------------------------------------------

def build_param_groups(method: "Method", model: "nn.Module", config: Any, options: TrainOptions) -> list[dict[str, Any]]:
    """Optimizer groups: the method's own (or one group), then layer-wise lr decay applied.

    With decay ``d`` and ``L`` layers, layer ``i`` trains at ``lr * d ** (L - 1 - i)``; the input
    embeddings get ``d ** L``, everything else outside the layers (head, final norm) 1. Layers are
    found from the model's module tree, so this works on any decoder (``transformer.h.N`` too).
    """

    groups = method.optimizer_groups(model, config, options)
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": options.lr}]
    decay = options.layerwise_lr_decay
    if decay >= 1.0:
        return [g for g in groups if g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    layer_index = layer_index_of(model)
    num_layers = len(decoder_layers(model))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_ids = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    split: dict[tuple, dict[str, Any]] = {}
    for group in groups:
        base_lr = group.get("lr", options.lr)
        for p in group["params"]:
            idx = layer_index(names.get(id(p), ""))
            if idx is None:
                depth = num_layers if id(p) in embedding_ids else 0
            else:
                depth = num_layers - 1 - idx
            lr = base_lr * decay**depth
            key = (lr, group.get("weight_decay", options.weight_decay))
            split.setdefault(key, {"params": [], "lr": lr, "weight_decay": key[1]})["params"].append(p)
    return list(split.values())


# -- the run -----------------------------------------------------------------------------------


def _checkpointing_argument() -> str:
    """transformers 5.x renamed ``gradient_checkpointing`` to ``activation_checkpointing``."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def training_arguments(options: TrainOptions, run_dir: str, has_eval: bool, half: str | None = None,
                       args_class: Any = None, **extra: Any):
    """``TrainingArguments`` (or a TRL config, ``args_class``) for our options; TensorBoard events
    land in ``run_dir/runs/``. ``extra`` are the args class's own fields (DPO's ``beta``, ...).

    ``half`` ("bfloat16"/"float16") turns on the Trainer's mixed precision for a half-precision base.
    """
    from transformers import TrainingArguments

    args_class = args_class or TrainingArguments
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if options.eval_steps else "epoch"
    checkpointing = {_checkpointing_argument(): options.gradient_checkpointing}
    if options.gradient_checkpointing:
        # non-reentrant checkpointing keeps gradients flowing to adapters behind frozen embeddings
        checkpointing[f"{_checkpointing_argument()}_kwargs"] = {"use_reentrant": False}
    return args_class(
        output_dir=run_dir,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        learning_rate=options.lr,
        lr_scheduler_type=options.scheduler,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,  # 0 turns clipping off in the Trainer
        seed=options.seed,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=options.eval_steps or None,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        report_to=["tensorboard"] if options.tensorboard else "none",
        disable_tqdm=not options.progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not _cuda_available(),
        bf16=half == "bfloat16",
        fp16=half == "float16",
        **checkpointing,
        **extra,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch before the adapter is created (its init is random too)."""
    from transformers import set_seed

    set_seed(seed)


def resolve_checkpoint(options: TrainOptions) -> str | None:
    """The Trainer checkpoint to resume from, checked before any model loads."""
    resume = options.resume_from_checkpoint
    if not resume:
        return None
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        run_dir = Path(options.run_dir or "")
        last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        if last is None:
            raise ConfigError(
                f"resume_from_checkpoint='last': no checkpoint-N directory in run dir {run_dir}; "
                "train with --save-steps N --run-dir DIR first"
            )
        return last
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(
            f"resume_from_checkpoint={resume!r} is not a Trainer checkpoint (no trainer_state.json); "
            "pass a RUN_DIR/checkpoint-N directory or 'last' with --run-dir"
        )
    return str(path)


def fit(
    method: "Method",
    model: "nn.Module",
    config: Any,
    dataset: Any,
    options: TrainOptions,
    *,
    eval_dataset: Any = None,
    tokenizer: Any = None,
    callbacks: list[Any] | None = None,
    task_eval: dict[str, Any] | None = None,
) -> TrainResult:
    """Supervised fine-tuning: the Hugging Face Trainer on an already-attached adapter model;
    ``task_eval``: a multi-task run's eval set per task (see :func:`adapterhub.mixture.eval_sets`)."""
    from transformers import Trainer

    has_eval = eval_dataset is not None and len(eval_dataset) > 0
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    def make_trainer(args: Any, optimizer: Any, all_callbacks: list[Any]) -> Any:
        return Trainer(
            model=model,
            args=args,
            data_collator=CausalCollator(pad_id),
            train_dataset=dataset,
            eval_dataset=eval_sets(eval_dataset, task_eval) if has_eval else None,
            callbacks=all_callbacks,
            optimizers=(optimizer, None),
        )

    return run_trainer(method, model, config, options, make_trainer, has_eval=has_eval, callbacks=callbacks)


EVAL_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")


def run_trainer(
    method: "Method",
    model: "nn.Module",
    config: Any,
    options: TrainOptions,
    make_trainer: Any,
    *,
    has_eval: bool,
    callbacks: list[Any] | None = None,
    args_class: Any = None,
    args: dict[str, Any] | None = None,
) -> TrainResult:
    """Run a Trainer (the Hugging Face one, or TRL's for other objectives) built by
    ``make_trainer(training_args, optimizer, callbacks)`` on an attached adapter model.

    Everything every objective shares lives here once: the run directory, resuming, mixed
    precision for a half-precision base, checkpointing, the method's optimizer groups and
    callbacks, early stopping, and the metrics a run reports.
    """
    import shutil

    import torch
    from transformers import EarlyStoppingCallback

    resume = resolve_checkpoint(options)
    scratch = options.run_dir is None
    run_dir = options.run_dir or tempfile.mkdtemp(prefix="adapterhub-run-")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if scratch and (options.tensorboard or options.save_steps):
        log.warning("checkpoints / TensorBoard logs go to %s (choose the place with --run-dir)", run_dir)
    half = upcast_trainable(model)
    training_args = training_arguments(options, run_dir, has_eval, half, args_class, **(args or {}))
    if options.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    all_callbacks = list(callbacks or []) + list(method.trainer_callbacks(model, config, options))
    if options.early_stopping_patience:
        all_callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=options.early_stopping_patience,
                early_stopping_threshold=options.early_stopping_threshold,
            )
        )
    groups = build_param_groups(method, model, config, options)
    optimizer = torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
    try:
        with method.training_context(model):  # the method's own needs, whatever the objective
            trainer = make_trainer(training_args, optimizer, all_callbacks)
            task_sets = split_task_sets(trainer)
            output = trainer.train(resume_from_checkpoint=resume)
        history = list(trainer.state.log_history)
        metrics: dict[str, Any] = {
            "train_loss": output.training_loss,
            "global_step": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "epoch": trainer.state.epoch,
            "world_size": training_args.world_size,  # processes that trained data-parallel (torchrun / accelerate)
            "train_runtime_s": output.metrics.get("train_runtime"),
        }
        losses = [entry["loss"] for entry in history if "loss" in entry]
        if losses:  # the first and last logged loss: did it move, and which way
            metrics.update(loss_first=losses[0], loss_last=losses[-1])
        if has_eval:
            metrics.update({k: v for k, v in trainer.evaluate().items() if k not in EVAL_TIMINGS})
            if task_sets:
                metrics.update(evaluate_tasks(trainer, task_sets))
    finally:
        if scratch and not options.tensorboard and not options.save_steps:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing in it the user asked for
    if options.gradient_checkpointing:
        _disable_checkpointing(model)
    model.eval()
    return TrainResult(model=model, metrics=metrics, history=history)


def upcast_trainable(model: Any) -> str | None:
    """Keep trainable weights in float32 on a half-precision base; returns that half dtype's name.

    The frozen base stays in bfloat16/float16 and the Trainer's autocast runs the matmuls in it,
    while the optimizer updates float32 weights (fp16 gradients cannot be unscaled, and bf16 ones
    lose small updates), as PEFT does for its adapters and LLaMA-Factory for full fine-tuning.
    """
    import torch

    half = None
    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16):
            half = half or str(param.dtype).removeprefix("torch.")
            if param.requires_grad:
                param.data = param.data.float()
    return half


def _disable_checkpointing(model: Any) -> None:
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        if hasattr(model, name):
            getattr(model, name)()
            return
