"""The objective contract: what a training run learns from, the second plugin axis beside methods.

A METHOD says what trains (LoRA, a bottleneck adapter, prefix, ...); an OBJECTIVE says from what:
supervised answers (``sft``), preference pairs (``dpo``, ``kto``), a reward model (``reward``),
rewards of sampled answers (``grpo``), a teacher's distributions (``distill``). Any method that
trains works with any objective: an objective attaches the method's adapter through
:meth:`TrainingJob.trainable` and runs a trainer (TRL's, where one fits) with the method's
optimizer groups and callbacks. Objectives are registered through
``adapterhub_register_objectives``, built-in ones exactly like third-party ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .config import MethodConfig

if TYPE_CHECKING:
    from .base import BaseModel
    from .method import Method
    from .training import TrainOptions, TrainResult

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"


@dataclasses.dataclass
class ObjectiveConfig(MethodConfig):
    """Base of every objective's config (``--objective-set KEY=VALUE``, YAML ``objective_config:``)."""

    method_name: ClassVar[str] = "objective"
    help_command: ClassVar[str] = "adapterhub objectives --objective {name}"


@dataclasses.dataclass
class TrainingJob:
    """Everything an objective needs for one run, resolved and checked before it is called."""

    method: "Method"
    method_config: Any
    options: "TrainOptions"
    config: ObjectiveConfig
    base: "BaseModel"
    rows: list[Any]
    data: str = "--data"
    """Where ``rows`` came from (for messages)."""
    eval_rows: list[Any] | None = None
    eval_tasks: dict[str, list[Any]] | None = None
    """A multi-task run's held-out rows per task (``--data`` files by name; ``eval_rows`` holds them
    all): pass their datasets to the trainer through :func:`adapterhub.training.eval_sets`, and each
    task's eval metrics land in the run's metrics as ``eval_<task>_loss``, ..."""
    callbacks: list[Any] = dataclasses.field(default_factory=list)
    resume_adapter: Path | None = None
    """The ``--from`` adapter's directory: training continues it instead of attaching a fresh one."""
    registry: str | None = None

    def trainable(self) -> Any:
        """The base with the method's adapter attached (or the ``--from`` adapter, trainable): the
        method decides (:meth:`Method.prepare`), the same for every objective."""
        return self.method.prepare(self.base.model, self.method_config, self.options, train_size=len(self.rows),
                                   resume_adapter=self.resume_adapter)


class Objective:
    """Base class of every training objective.

    Subclasses set ``name``, ``description``, ``data_shape`` and ``config_class`` and implement
    :meth:`read_data` (validate every line: ``file:line: reason``) and :meth:`train`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    data_shape: ClassVar[str] = ""
    """One line shown by ``adapterhub objectives``: the JSON object each data line holds."""
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    experimental: ClassVar[bool] = False
    """Built on what TRL marks experimental: listed with that label, never a default."""
    head: ClassVar[str] = CAUSAL_LM
    """The model the adapter trains on: ``causal-lm``, or ``sequence-classification`` (a reward
    model: the base with a one-score head, saved with the adapter)."""
    lr_scale: ClassVar[float | None] = None
    """The objective's learning rate as a fraction of the method's recommended one (unless the user
    sets ``--lr``): methods' recommended options were measured with SFT, and a preference objective
    wants a smaller step on the same adapter. A fraction, not a value, because methods' own rates
    differ by 100x (LoRA 1e-3, IA3 2e-2, prompt tuning 1e-1)."""
    recommended_options: ClassVar[dict[str, Any]] = {}
    """Training options this objective gets unless the user sets them (over the method's own)."""

    #: Set by the plugin manager: "built-in" or the distribution that provided the objective.
    origin: str = "built-in"

    def make_config(self, values: dict[str, Any] | None = None) -> ObjectiveConfig:
        return self.config_class.from_dict(values or {})

    def check(self, config: ObjectiveConfig, *, registry: str | None = None) -> None:
        """Check what the config names (teacher, reward, ...) before the base loads; raise
        ``ConfigError`` naming the key and the fix."""

    def check_method(self, method: "Method") -> None:
        """Refuse, before the base loads, a method this objective cannot train (``ConfigError``
        naming both and what to use instead); the default accepts every method."""

    def read_data(self, path: str | Path) -> list[Any]:
        """Every example of a JSON Lines file, validated; ``DataError`` with ``file:line: reason``."""
        raise NotImplementedError(f"objective {self.name!r} does not implement read_data()")

    def train(self, job: TrainingJob) -> "TrainResult":
        """Train the method's adapter on ``job.rows`` and return the trained model and metrics."""
        raise NotImplementedError(f"objective {self.name!r} does not implement train()")

    def lineage(self, job: TrainingJob) -> dict[str, Any]:
        """What the registry records beside the objective's name and config: the reference model,
        the teacher, the reward used (strings a reader can follow)."""
        return {}

    def save_extra(self, model: Any, directory: Path) -> None:
        """Files this objective adds to the adapter directory (a reward model's score head)."""

    def __repr__(self) -> str:
        return f"<Objective {self.name} from {self.origin}>"
