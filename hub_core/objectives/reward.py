"""``reward``: a reward model as an adapter, trained on preference pairs with TRL's RewardTrainer.

The base loads with a one-score head (``AutoModelForSequenceClassification``, num_labels=1); the
method's adapter attaches to that model and the head trains with it on the Bradley-Terry loss
(``chosen`` should score above ``rejected``). The method saves its adapter as for any objective;
the head, which no method knows about, is saved beside it as ``reward_head.safetensors``, and
:class:`~adapterhub.objectives.scoring.RewardModel` loads both back. The lineage records
``head: sequence-classification``: the server refuses to generate with such an adapter, while
``adapterhub score`` and ``grpo``'s ``reward=adapter:TASK@N`` score with it.

Every method whose adapter keeps an answer's score independent of how the batch pads it works:
the LoRA family, IA3, prefix, the bottleneck adapter, BitFit, freeze, full. Prompt tuning and
P-tuning feed the model embeddings instead of ``input_ids``, so the head cannot find each
sequence's last token; a check before training refuses them (and any plugin method like them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub.config import option
from adapterhub.errors import ConfigError
from adapterhub.objective import SEQUENCE_CLASSIFICATION, Objective, ObjectiveConfig, TrainingJob
from adapterhub.objectives import scoring, shapes
from adapterhub.objectives.scoring import HEAD_FILE, load_head, render, rewards, save_head, score_head
from adapterhub.objectives.trl_run import last_logged, run_trl

WORKING_METHODS = "lora, qlora, dora, adalora, loraplus, ia3, prefix, adapter, bitfit, freeze, full"


@dataclasses.dataclass
class RewardConfig(ObjectiveConfig):
    method_name = "reward"

    center_rewards_coefficient: float = option(
        0.0, "pull rewards towards mean zero (Eisenstein et al., 2023; TRL suggests 0.01; 0: off)")

    def validate(self) -> None:
        if not self.center_rewards_coefficient >= 0:
            raise ConfigError(f"reward config: center_rewards_coefficient={self.center_rewards_coefficient} must be "
                              ">= 0, e.g. --objective-set center_rewards_coefficient=0.01")


class Reward(Objective):
    name = "reward"
    description = ("A reward model: the base with a score head plus the method's adapter, scoring 'chosen' above "
                   "'rejected' (TRL's RewardTrainer); score with `adapterhub score`.")
    data_shape = shapes.PAIRS_SHAPE
    config_class = RewardConfig
    head = SEQUENCE_CLASSIFICATION

    def check_method(self, method: Any) -> None:
        """Soft prompts feed embeddings, and the score head reads the last non-pad token of input_ids; a
        method that does not declare them is still caught by the padding check once its adapter is on."""
        if method.virtual_tokens == "input":
            raise ConfigError(f"reward: method {method.name!r} cannot train a reward model: it feeds soft-prompt "
                              "embeddings, so an answer's score would change with the batch's padding. "
                              f"Methods that work: {WORKING_METHODS}")

    def read_data(self, path: str | Path) -> list[Any]:
        return shapes.read_pairs(path)

    def train(self, job: TrainingJob) -> Any:
        from trl import RewardConfig as TrlRewardConfig
        from trl import RewardTrainer

        config: RewardConfig = job.config  # type: ignore[assignment]
        check_lengths(job)
        scoring.ready_for_methods(job.base.model)
        if job.resume_adapter is not None:
            continued_head(job)
        else:
            scoring.init_head(job.base.model)  # from --seed, which the pipeline applied after the base loaded
        with scoring.head_apart(job.base.model):
            model = job.trainable()
        for param in scoring.score_head(model)[1].parameters():
            param.requires_grad_(True)
        check_padding(job, model)
        args = {"center_rewards_coefficient": config.center_rewards_coefficient or None}
        result = run_trl(job, RewardTrainer, TrlRewardConfig, model=model, args=args, after_init=head_in_float32)
        logged = last_logged(result.history, "accuracy", "margin")
        result.metrics.update({f"train_{key}": value for key, value in logged.items()})
        return result

    def lineage(self, job: TrainingJob) -> dict[str, Any]:
        return {"head": SEQUENCE_CLASSIFICATION}

    def save_extra(self, model: Any, directory: Path) -> None:
        save_head(model, directory)


def check_lengths(job: TrainingJob) -> None:
    """TRL's RewardTrainer silently drops pairs longer than max_length; refuse them instead."""

    limit, tokenizer = job.options.max_length, job.base.tokenizer
    for kind, rows in (("training", job.rows), ("eval", job.eval_rows or [])):
        lengths = [max(len(render(tokenizer, r["prompt"], r[key][0]["content"])) for key in ("chosen", "rejected"))
                   for r in rows]
        over = [n for n in lengths if n > limit]
        if over:
            raise ConfigError(f"reward: {len(over)} of {len(rows)} {kind} pairs of {job.data} are longer than "
                              f"--max-length {limit} tokens with their prompt (the longest: {max(over)}); raise "
                              "--max-length or shorten them (a reward model reads the whole answer, so none is cut)")


def head_in_float32(trainer: Any) -> None:
    """TRL casts a quantized model's trainable weights to bfloat16; the head is a plain Linear (no
    PEFT layer casting its input), so it stays float32 like every trainable weight here."""

    for param in score_head(trainer.model)[1].parameters():
        param.data = param.data.float()


def continued_head(job: TrainingJob) -> None:
    """``--from``: the parent's head goes on the base before its adapter, as when scoring."""

    assert job.resume_adapter is not None
    if not (job.resume_adapter / HEAD_FILE).is_file():
        raise ConfigError(f"--from {job.resume_adapter}: not a reward model (no {HEAD_FILE}); continue a reward "
                          "adapter, or train a fresh one without --from")
    load_head(job.base.model, job.resume_adapter)


def check_padding(job: TrainingJob, model: Any) -> None:
    """The head reads each sequence's last non-pad token of ``input_ids``; a method that feeds the
    model embeddings instead (prompt tuning, P-tuning) makes a padded answer score differently."""

    row = job.rows[0]
    ids = render(job.base.tokenizer, row["prompt"], row["chosen"][0]["content"])
    short = ids[: max(2, len(ids) // 2)]  # padded to ``ids``' length when batched with it
    pad = job.base.tokenizer.pad_token_id
    model.eval()  # no dropout in the comparison; the trainer switches to train mode itself
    alone = rewards(model, pad, [short], 1)[0]
    padded = rewards(model, pad, [short, ids], 2)[0]
    if abs(alone - padded) > 1e-3 * max(1.0, abs(alone)):
        raise ConfigError(
            f"reward: method {job.method.name!r} cannot train a reward model: with its adapter an answer's score "
            f"changes when the batch pads it ({alone:.4g} alone, {padded:.4g} padded). The score head reads the "
            "last non-pad token of input_ids; soft-prompt methods (prompt, ptuning) feed embeddings instead. "
            f"Methods that work: {WORKING_METHODS}"
        )


@adapterhub.hookimpl
def adapterhub_register_objectives(register: Any) -> None:
    register(Reward())
