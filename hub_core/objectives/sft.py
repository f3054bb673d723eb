"""``sft``: supervised fine-tuning on instruction or chat answers (the default objective).

The same run as every objective: the method prepares its adapter (:meth:`Method.prepare`) and the
shared trainer run (``training.fit`` -> ``run_trainer``) enters its training context and takes its
optimizer groups and callbacks; the Hugging Face Trainer with the loss on the answer tokens only.
A third-party method that overrides ``Method.train`` (the hook from before ``prepare``) is still
called through it, so such a plugin keeps working unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub.data import read_examples, tokenize_examples
from adapterhub.objective import Objective, ObjectiveConfig, TrainingJob
from adapterhub.training import fit


@dataclasses.dataclass
class SftConfig(ObjectiveConfig):
    method_name = "sft"


class Sft(Objective):
    name = "sft"
    description = "Supervised fine-tuning: learn the answers (loss on the assistant tokens only)."
    data_shape = '{"instruction", "input"?, "output"} | {"messages": [{"role", "content"}, ...]}'
    config_class = SftConfig

    def read_data(self, path: str | Path) -> list[Any]:
        return read_examples(path)

    def train(self, job: TrainingJob) -> Any:
        options, tokenizer = job.options, job.base.tokenizer
        train_set = tokenize_examples(job.rows, tokenizer, options.max_length, job.data)
        eval_set = None
        if job.eval_rows is not None:
            eval_set = tokenize_examples(job.eval_rows, tokenizer, options.max_length, options.eval_data or job.data)
        task_eval = {name: tokenize_examples(rows, tokenizer, options.max_length, name)
                     for name, rows in (job.eval_tasks or {}).items()}
        method = job.method
        if overrides_train(method):
            return method.train(job.base.model, train_set, job.method_config, options, eval_dataset=eval_set,
                                tokenizer=tokenizer, callbacks=job.callbacks, resume_adapter=job.resume_adapter)
        return fit(method, job.trainable(), job.method_config, train_set, options, eval_dataset=eval_set,
                   tokenizer=tokenizer, callbacks=job.callbacks, task_eval=task_eval)


def overrides_train(method: adapterhub.Method) -> bool:
    """Whether a plugin replaced ``Method.train`` itself (then it owns its SFT run)."""
    return type(method).train is not adapterhub.Method.train


@adapterhub.hookimpl
def adapterhub_register_objectives(register: Any) -> None:
    register(Sft())
