"""``grpo``: online RL from rewards of the adapter's own sampled answers (TRL's GRPOTrainer).

For every prompt the model samples ``num_generations`` answers with transformers' ``generate`` on
the model being trained (no vLLM, no second inference server); the rewards (see
:mod:`adapterhub.rewards`: built-in verifiable rewards, a function by entry point or
``module:function``, or a reward-model adapter from the registry) are compared within that group,
and answers better than their group's mean become more likely.

The KL penalty ``beta`` is 0 by default (TRL's default): no reference model at all. With
``beta > 0`` the reference is the base with the adapter disabled, which only methods PEFT runs
can provide; for the others TRL would load a second copy of the base, so such a run is refused.
Prompts are never truncated: prompt plus ``max_completion_length`` must fit ``--max-length``.
Every method trains (LoRA family, IA3, prefix, prompt, bottleneck adapter, BitFit, ...): sampling
goes through the adapted model's own ``generate``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub.chat import render_prompt
from adapterhub.config import option
from adapterhub.errors import ConfigError, DataError
from adapterhub.objective import Objective, ObjectiveConfig, TrainingJob
from adapterhub.objectives import shapes
from adapterhub.objectives.trl_run import base_as_reference, last_logged, run_trl
from adapterhub.registry import open_registry
from adapterhub.rewards import COLUMNS, SPEC_HELP, AdapterReward, resolve_rewards

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


@dataclasses.dataclass
class GrpoConfig(ObjectiveConfig):
    method_name = "grpo"

    reward: str = option("", f"what scores each sampled answer (required): {SPEC_HELP}")
    num_generations: int = option(4, "answers sampled per prompt and compared with each other "
                                      "(--batch-size x --grad-accum must be a multiple)")
    max_completion_length: int = option(32, "tokens sampled per answer at most")
    temperature: float = option(1.0, "sampling temperature: the answers to one prompt must differ to teach anything")
    beta: float = option(0.0, "KL penalty towards the base (0: none, no reference model; > 0 needs a PEFT method)")
    loss_type: str = option("dapo", "TRL's GRPO loss (how token losses are averaged)", choices=LOSS_TYPES)

    def validate(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"grpo config: num_generations={self.num_generations} must be >= 2 "
                              "(a reward only teaches relative to the other answers to the same prompt)")
        if self.max_completion_length < 1:
            raise ConfigError(f"grpo config: max_completion_length={self.max_completion_length} must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"grpo config: temperature={self.temperature} must be > 0 (GRPO samples answers)")
        if not self.beta >= 0:
            raise ConfigError(f"grpo config: beta={self.beta} must be >= 0")


def grpo_arguments(**values: Any) -> Any:
    """TRL's ``GRPOConfig``. It has no ``max_length`` (every objective gets ours): GRPO bounds the
    answer with ``max_completion_length``, and :func:`check_prompt_lengths` checks the rest."""
    from trl import GRPOConfig

    values.pop("max_length", None)
    return GRPOConfig(**values)


def check_batch(job: TrainingJob, config: GrpoConfig) -> None:
    """TRL samples whole groups per optimizer step; say so in our flags' words, before any model work."""
    options, group = job.options, config.num_generations
    if (options.batch_size * options.grad_accum) % group:
        raise ConfigError(f"grpo: --batch-size {options.batch_size} x --grad-accum {options.grad_accum} must be a "
                          f"multiple of num_generations={group} (each step scores whole groups of answers); "
                          f"e.g. --batch-size {group * max(1, options.batch_size // group)}")
    if job.eval_rows and options.batch_size % group:
        raise ConfigError(f"grpo: with eval data --batch-size {options.batch_size} must be a multiple of "
                          f"num_generations={group} (evaluation samples whole groups per batch)")
    if config.beta > 0 and job.method.peft_type is None:
        raise ConfigError(f"grpo: beta={config.beta} needs a reference model; for method {job.method.name!r} TRL "
                          "would load a second copy of the base. Use beta=0 (the default), or a PEFT method "
                          "(lora, dora, ia3, ...) whose reference is the base with the adapter disabled")


def check_columns(job: TrainingJob, spec: str) -> None:
    """A built-in reward that reads a column must find it on every line, not fail mid-run."""

    for name in (part.rpartition("*")[2].strip() for part in spec.split(",")):  # "2*keyword": keyword
        column = COLUMNS.get(name)
        for index, row in enumerate(job.rows + (job.eval_rows or [])):
            if column and row.get(column) is None:
                raise DataError(f"{job.data}: example {index + 1} has no {column!r} column, which the {name} reward "
                                f"reads; add \"{column}\": ... to every line")


def check_prompt_lengths(job: TrainingJob, config: GrpoConfig) -> None:
    budget = job.options.max_length - config.max_completion_length
    tokenizer = job.base.tokenizer
    for index, row in enumerate(job.rows):
        n = len(tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"])
        if n > budget:
            raise DataError(f"{job.data}: example {index + 1} has a prompt of {n} tokens; with "
                            f"max_completion_length={config.max_completion_length} it passes --max-length "
                            f"{job.options.max_length}. Raise --max-length or shorten the prompt")


def reward_trend(history: list[dict[str, Any]]) -> dict[str, float]:
    """Did the answers get better? The mean logged reward over the first and the last quarter of
    the logged steps (one step's reward rests on a few prompts: too noisy alone)."""
    rewards = [entry["reward"] for entry in history if entry.get("reward") is not None and "loss" in entry]
    if not rewards:
        return {}
    k = max(1, len(rewards) // 4)
    return {"train_reward_start": sum(rewards[:k]) / k, "train_reward_end": sum(rewards[-k:]) / k}


class Grpo(Objective):
    name = "grpo"
    description = ("Online RL: sample answers, score them with a reward (function or reward adapter), "
                   "reinforce the better ones (TRL's GRPOTrainer).")
    data_shape = shapes.PROMPTS_SHAPE
    config_class = GrpoConfig

    def __init__(self) -> None:
        self._rewards: dict[int, list[str]] = {}  # per job: the descriptions lineage() records

    def check(self, config: ObjectiveConfig, *, registry: str | None = None) -> None:
        resolve_rewards(config.reward, registry=registry)  # type: ignore[attr-defined]

    def read_data(self, path: str | Path) -> list[Any]:
        return shapes.read_prompts(path)

    def train(self, job: TrainingJob) -> Any:
        from trl import GRPOTrainer

        config: GrpoConfig = job.config  # type: ignore[assignment]
        check_batch(job, config)
        check_columns(job, config.reward)
        check_prompt_lengths(job, config)
        rewards = resolve_rewards(config.reward, registry=job.registry)
        self._rewards[id(job)] = [reward.description for reward in rewards]
        device = str(next(job.base.model.parameters()).device)
        for reward in rewards:
            if isinstance(reward.function, AdapterReward):
                reward.function.load(base=same_base(reward.function, job), device=device)
        args = {"num_generations": config.num_generations, "max_completion_length": config.max_completion_length,
                "temperature": config.temperature, "beta": config.beta, "loss_type": config.loss_type,
                "reward_weights": [reward.weight for reward in rewards]}
        result = run_trl(job, GRPOTrainer, grpo_arguments, args=args, after_init=base_as_reference,
                         reward_funcs=[reward.function for reward in rewards])
        result.metrics.update(reward_trend(result.history))
        result.metrics.update(last_logged(result.history, "completions/mean_length"))
        return result

    def lineage(self, job: TrainingJob) -> dict[str, Any]:
        beta = job.config.beta  # type: ignore[attr-defined]
        reference = "the base with the adapter disabled" if beta > 0 else "none (beta=0: no KL penalty)"
        return {"rewards": self._rewards.pop(id(job), []), "reference": reference, "sampling": "transformers generate"}


def same_base(reward: Any, job: TrainingJob) -> str | None:
    """The policy's base directory when the reward adapter was trained on the same weights (a path
    known to load here); otherwise None, and the reward model loads the base its manifest names."""

    manifest = open_registry(reward.registry).manifest(reward.reference)
    return str(job.base.directory) if manifest.base_fingerprint == job.base.fingerprint else None


@adapterhub.hookimpl
def adapterhub_register_objectives(register: Any) -> None:
    register(Grpo())
