"""``orpo`` and ``simpo``: preference optimisation without a reference model, labelled experimental.

TRL 1.16 keeps ORPO and CPO (whose ``simpo`` loss is SimPO) in ``trl.experimental``: their API may
change in any TRL release, so they are listed as experimental and never a default. The stable
paths are ``dpo`` (paired) and ``kto`` (unpaired). Both read the same pairs as ``dpo``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub.config import option
from adapterhub.errors import ConfigError
from adapterhub.objective import Objective, ObjectiveConfig, TrainingJob
from adapterhub.objectives import shapes
from adapterhub.objectives.trl_run import run_trl


@dataclasses.dataclass
class OrpoConfig(ObjectiveConfig):
    method_name = "orpo"

    beta: float = option(0.1, "weight of the odds-ratio preference term beside the SFT loss on 'chosen' (lambda)")

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"orpo config: beta={self.beta} must be > 0, e.g. --objective-set beta=0.1")


@dataclasses.dataclass
class SimpoConfig(ObjectiveConfig):
    method_name = "simpo"

    beta: float = option(2.0, "scale of the length-normalised reward")
    gamma: float = option(0.5, "target reward margin between chosen and rejected")

    def validate(self) -> None:
        if not self.beta > 0 or self.gamma < 0:
            raise ConfigError(f"simpo config: beta={self.beta} must be > 0 and gamma={self.gamma} >= 0")


class _ReferenceFree(Objective):
    data_shape = shapes.PAIRS_SHAPE
    experimental = True

    def read_data(self, path: str | Path) -> list[Any]:
        return shapes.read_pairs(path)

    def lineage(self, job: TrainingJob) -> dict[str, Any]:
        return {"reference": "none (reference-free)", "trl": "experimental"}


class Orpo(_ReferenceFree):
    name = "orpo"
    description = "ORPO: SFT on 'chosen' plus an odds-ratio preference term, no reference (TRL experimental)."
    config_class = OrpoConfig

    def train(self, job: TrainingJob) -> Any:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return run_trl(job, ORPOTrainer, ORPOConfig, args={"beta": job.config.beta})


class Simpo(_ReferenceFree):
    name = "simpo"
    description = "SimPO: length-normalised preference margin, no reference (TRL experimental CPOTrainer)."
    config_class = SimpoConfig

    def train(self, job: TrainingJob) -> Any:
        from trl.experimental.cpo import CPOConfig, CPOTrainer


        config: SimpoConfig = job.config  # type: ignore[assignment]
        args = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": config.beta, "simpo_gamma": config.gamma}
        return run_trl(job, CPOTrainer, CPOConfig, args=args)


@adapterhub.hookimpl
def adapterhub_register_objectives(register: Any) -> None:
    register(Orpo())
    register(Simpo())
