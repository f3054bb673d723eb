"""AdaLoRA: LoRA in SVD form whose rank budget is pruned during training (Zhang et al., 2023).

PEFT needs the run's total step count up front and a call to ``update_and_allocate`` after every
optimizer step (after ``backward``, before ``zero_grad``: it scores ranks by ``|p * grad|``). Both
are wired to the Hugging Face Trainer here: ``train`` estimates the total from the options, and a
callback re-reads the Trainer's own ``max_steps`` when training begins and allocates on
``on_optimizer_step``. Served as a LoraForm with ``B @ diag(E)`` and the scaling folded into B.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import adapterhub
from adapterhub import AdapterFiles, Capabilities, ConfigError, MethodConfig, option
from adapterhub.plugins._peft import PeftMethod, base_module_name, refuse_quantized
from adapterhub.serving_forms import LoraForm


@dataclasses.dataclass
class AdaLoraConfig(MethodConfig):
    method_name = "adalora"

    r: int = option(12, "initial rank of every adapted matrix (PEFT's init_r); pruned towards target_r")
    target_r: int = option(4, "average rank left after pruning (PEFT's target_r)")
    alpha: float = option(16.0, "scaling numerator: the update is scaled by alpha / r (r = the initial rank)")
    dropout: float = option(0.0, "dropout on the adapter input during training")
    target_modules: list[str] = option(["all-linear"], "module names to adapt ('all-linear': every Linear but the head)")
    init_fraction: float = option(0.1, "share of the run's steps at full rank before pruning starts (PEFT's tinit)")
    final_fraction: float = option(0.3, "share of the run's steps at the final ranks after pruning (PEFT's tfinal)")
    delta_t: int = option(1, "steps between two rank re-allocations (PEFT's deltaT)")
    beta1: float = option(0.85, "EMA coefficient of the importance scores")
    beta2: float = option(0.85, "EMA coefficient of the importance uncertainty")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality regulariser on A and B")

    def validate(self) -> None:
        if not 1 <= self.target_r <= self.r <= 4096:
            raise ConfigError(
                f"adalora config: need 1 <= target_r ({self.target_r}) <= r ({self.r}) <= 4096, e.g. --set r=12"
            )
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"adalora config: alpha={self.alpha} must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adalora config: dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("adalora config: target_modules is empty; e.g. --set target_modules=q_proj,v_proj")
        if not (0 <= self.init_fraction < 1 and 0 <= self.final_fraction < 1
                and self.init_fraction + self.final_fraction < 1):
            raise ConfigError(
                f"adalora config: init_fraction={self.init_fraction} + final_fraction={self.final_fraction} "
                "must leave room for pruning (each in [0, 1), sum < 1), e.g. --set init_fraction=0.1"
            )
        for key in ("beta1", "beta2"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"adalora config: {key}={getattr(self, key)} must be in (0, 1)")
        if self.delta_t < 1:
            raise ConfigError(f"adalora config: delta_t={self.delta_t} must be >= 1")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"adalora config: orth_reg_weight={self.orth_reg_weight} must be >= 0")

    def schedule(self, total_step: int) -> dict[str, int]:
        """PEFT's step counts for a run of ``total_step`` steps; always leaves a pruning phase."""
        total_step = max(3, total_step)
        tinit = int(self.init_fraction * total_step)
        tfinal = min(int(self.final_fraction * total_step), total_step - tinit - 1)
        return {"total_step": total_step, "tinit": tinit, "tfinal": tfinal}


def planned_steps(options: Any, num_examples: int) -> int:
    """Optimizer steps the Trainer will run, as it computes them (per process under torchrun)."""
    if options.max_steps > 0:
        return options.max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(num_examples / (options.batch_size * world))
    per_epoch = max(1, batches // options.grad_accum)
    return max(1, math.ceil(options.epochs * per_epoch))


PLACEHOLDER_TOTAL_STEP = 100


class AdaLoraMethod(PeftMethod):
    name = "adalora"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 0.84 (ranks pruned during the run want a larger lr).
    foldable_bottom = True  # its change adds to the layer's output: merged under a top, as the server composes it
    reference_copy = False  # PEFT's AdaLoraModel trains one adapter and refuses a second beside it
    recommended_options = {"lr": 3e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = AdaLoraConfig
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    description = "LoRA with an adaptive rank budget pruned by importance during training (PEFT AdaLoRA)."
    peft_type = "ADALORA"

    def peft_config(self, config: AdaLoraConfig, total_step: int | None = None) -> Any:
        from peft import AdaLoraConfig as PeftAdaLoraConfig

        if total_step is None:
            raise ConfigError("adalora: the rank schedule needs the run's total optimizer steps; pass total_step")
        targets = config.target_modules
        return PeftAdaLoraConfig(
            init_r=config.r,
            target_r=config.target_r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets[0] if targets == ["all-linear"] else list(targets),
            deltaT=config.delta_t,
            beta1=config.beta1,
            beta2=config.beta2,
            orth_reg_weight=config.orth_reg_weight,
            task_type="CAUSAL_LM",
            **config.schedule(total_step),
        )

    def attach(self, model: Any, config: AdaLoraConfig, *, total_step: int | None = None) -> Any:
        """Without a step count (inspection, docs) a placeholder schedule is used; training always
        passes the planned count, and the callback re-syncs it to the Trainer's own when it starts."""
        from peft import get_peft_model

        refuse_quantized(self, model)  # as PeftMethod.attach does: the flag decides
        return get_peft_model(model, self.peft_config(config, total_step or PLACEHOLDER_TOTAL_STEP))

    def prepare(self, model: Any, config: AdaLoraConfig, options: Any, *, train_size: int,
                resume_adapter: Any = None) -> Any:
        """Attach with the planned step count; the callback then follows the Trainer's exact count."""
        if resume_adapter is not None:
            return super().prepare(model, config, options, train_size=train_size, resume_adapter=resume_adapter)
        return self.attach(model, config, total_step=planned_steps(options, train_size))

    def trainer_callbacks(self, model: Any, config: AdaLoraConfig, options: Any) -> list[Any]:
        return [_budget_callback(config)]

    def serving_form(self, files: AdapterFiles, base_config: Any) -> Any:
        return adalora_form(files)


def _budget_callback(config: AdaLoraConfig) -> Any:
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        """Runs AdaLoRA's rank allocation between ``optimizer.step()`` and ``zero_grad()``."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            peft_config = model.peft_config[model.active_adapter]
            for key, value in config.schedule(state.max_steps).items():
                setattr(peft_config, key, value)  # the rank allocator reads this same config object

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return AdaLoraBudget()


def adalora_form(files: AdapterFiles) -> Any:
    """LoraForm of a PEFT AdaLoRA directory: ``delta = x (A)^T (B diag(E) * alpha / (init_r + 1e-5))^T``.

    PEFT divides by the *initial* rank (``ranknum``) even after pruning, and adds 1e-5 to it.
    """

    cfg = files.read_json("adapter_config.json")
    alpha = cfg.get("lora_alpha") or 0
    scale = (alpha if alpha > 0 else cfg["init_r"]) / (cfg["init_r"] + 1e-5)
    state = files.read_tensors()
    deltas = {}
    for key, a in state.items():
        if ".lora_A" not in key:
            continue
        e = state[key.replace(".lora_A", ".lora_E")].float()  # [r, 1]
        b = state[key.replace(".lora_A", ".lora_B")].float()  # [out, r]
        if a.shape[0] == 0:
            continue  # every rank of this matrix was pruned
        module = base_module_name(key.split(".lora_A")[0])
        deltas[module] = (a.float().contiguous(), (b * e.T * scale).contiguous())
    return LoraForm(deltas=deltas)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(AdaLoraMethod())
