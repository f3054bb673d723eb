"""``dpo`` and ``kto``: learning from preferences without a reward model, on TRL's trainers.

The reference is the base: for methods PEFT runs, the same model with the adapter disabled (TRL
computes it that way; we drop the copy of the starting adapter TRL would otherwise keep as the
reference); for the others (bottleneck adapter, BitFit, freeze, full), whose fresh adapters start
as the identity, the model's log-probs are computed once before the first step. Neither keeps a
second copy of the base in memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub.config import option
from adapterhub.errors import ConfigError
from adapterhub.objective import Objective, ObjectiveConfig, TrainingJob
from adapterhub.objectives import shapes, trl_run

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


@dataclasses.dataclass
class DpoConfig(ObjectiveConfig):
    method_name = "dpo"

    beta: float = option(0.1, "how far the adapter may move from the reference (higher: closer to it)")
    loss_type: str = option("sigmoid", "TRL's DPO loss (sigmoid is DPO; ipo, hinge, robust... its variants)",
                            choices=DPO_LOSSES)
    label_smoothing: float = option(0.0, "assumed label noise for the robust / exo_pair losses, in [0, 0.5)")

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"dpo config: beta={self.beta} must be > 0, e.g. --objective-set beta=0.1")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo config: label_smoothing={self.label_smoothing} must be in [0, 0.5)")


@dataclasses.dataclass
class KtoConfig(ObjectiveConfig):
    method_name = "kto"

    beta: float = option(0.1, "how far the adapter may move from the reference (higher: closer to it)")
    desirable_weight: float = option(1.0, "weight of good examples (raise it when they are the fewer)")
    undesirable_weight: float = option(1.0, "weight of bad examples (raise it when they are the fewer)")

    def validate(self) -> None:
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"kto config: {key}={getattr(self, key)} must be > 0")


def reference_lineage(job: TrainingJob) -> str:
    if job.method.peft_type is not None:
        return "the base with the adapter disabled"
    start = f"the --from adapter {job.resume_adapter}" if job.resume_adapter else "the base"
    return f"{start} (the model as training started; its log-probs computed once before the first step)"


def check_reference_copy(objective: Objective, method: Any) -> None:
    """TRL's DPO and KTO trainers add a frozen copy of a PEFT adapter beside the trained one."""
    if not method.reference_copy:
        raise ConfigError(f"{objective.name}: method {method.name!r} cannot hold the frozen copy of its adapter that "
                          f"TRL's {objective.name.upper()} trainer adds beside it; train with lora or dora instead")


def reference_args(job: TrainingJob, model: Any) -> dict[str, Any]:
    """Outside PEFT, TRL would load a second copy of the base as the reference; precomputing the
    reference log-probs from the model as it starts needs none."""
    return {} if trl_run.is_peft(model) else {"precompute_ref_log_probs": True}


class Dpo(Objective):
    name = "dpo"
    description = "Direct preference optimisation: prefer 'chosen' over 'rejected' (TRL's DPOTrainer)."
    data_shape = shapes.PAIRS_SHAPE
    config_class = DpoConfig
    # examples/objectives/sweep_lr.py (LoRA, SmolLM2-135M-Instruct, 12 steps; bench/results/objectives/
    # sweep_lr_dpo.json): at LoRA's SFT lr 1e-3 the held-out answers turn to garbage; at 2e-4 the
    # model's own preference moves (0.38 -> 0.58) and the answers stay readable; 5e-5 barely moves it.
    # A fifth of LoRA's SFT rate; taken as a fraction so methods with other rates (ia3, prompt) scale too.
    lr_scale = 0.2

    def read_data(self, path: str | Path) -> list[Any]:
        return shapes.read_pairs(path)

    def check_method(self, method: Any) -> None:
        check_reference_copy(self, method)

    def train(self, job: TrainingJob) -> Any:
        from trl import DPOConfig, DPOTrainer


        config: DpoConfig = job.config  # type: ignore[assignment]
        model = job.trainable()
        args = {"beta": config.beta, "loss_type": [config.loss_type], "label_smoothing": config.label_smoothing,
                **reference_args(job, model)}
        result = trl_run.run_trl(job, DPOTrainer, DPOConfig, model=model, args=args, after_init=trl_run.base_as_reference)
        result.metrics.update(trl_run.last_logged(result.history, "rewards/accuracies", "rewards/margins"))
        return result

    def lineage(self, job: TrainingJob) -> dict[str, Any]:
        return {"reference": reference_lineage(job)}


class Kto(Objective):
    name = "kto"
    description = "KTO: learn from unpaired good/bad answers (TRL's KTOTrainer)."
    data_shape = shapes.UNPAIRED_SHAPE
    config_class = KtoConfig
    # The same sweep (bench/results/objectives/sweep_lr_kto.json, the pairs split into unpaired rows):
    # garbage answers at 1e-3, own preference 0.38 -> 0.54 with readable answers at 2e-4, no move at 5e-5.
    lr_scale = 0.2

    def read_data(self, path: str | Path) -> list[Any]:
        return shapes.read_unpaired(path)

    def check_method(self, method: Any) -> None:
        check_reference_copy(self, method)

    def train(self, job: TrainingJob) -> Any:
        from trl import KTOConfig, KTOTrainer


        config: KtoConfig = job.config  # type: ignore[assignment]
        labels = {row["label"] for row in job.rows}
        if labels != {True, False}:
            raise ConfigError(f"kto: {job.data} has only {'good' if True in labels else 'bad'} examples; "
                              "KTO needs both (label true and label false)")
        if job.options.batch_size < 2:
            raise ConfigError("kto: --batch-size must be >= 2 (KTO estimates its KL term across a batch)")
        model = job.trainable()
        args = {"beta": config.beta, "desirable_weight": config.desirable_weight,
                "undesirable_weight": config.undesirable_weight, **reference_args(job, model)}
        return trl_run.run_trl(job, KTOTrainer, KTOConfig, model=model, args=args, after_init=trl_run.base_as_reference)

    def lineage(self, job: TrainingJob) -> dict[str, Any]:
        return {"reference": reference_lineage(job)}


@adapterhub.hookimpl
def adapterhub_register_objectives(register: Any) -> None:
    register(Dpo())
    register(Kto())
