"""QLoRA: LoRA trained on a base quantized to 4-bit NormalFloat (Dettmers et al., 2023).

The frozen base is loaded in nf4 (``default_quantize``), so the CLI quantizes unless told
otherwise; the LoRA matrices stay in full precision and are stored exactly like LoRA's, so the
adapter also loads (and merges) on the full-precision base. Merging into the 4-bit base itself is
refused: rounding the merged weights back to 4 bit would lose the adapter.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import adapterhub
from adapterhub import Capabilities
from adapterhub.plugins._peft import is_quantized
from adapterhub.plugins.lora import LoraConfig, LoraMethod

log = logging.getLogger(__name__)


@dataclasses.dataclass
class QLoraConfig(LoraConfig):
    method_name = "qlora"


class QLoraMethod(LoraMethod):
    name = "qlora"
    # Measured on SmolLM2-135M-Instruct (examples/method_accuracy.py): 160 examples, batch 8, these
    # options (60 steps): flip 0.91 on the nf4 base.
    recommended_options = {"lr": 1e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = QLoraConfig
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    description = "LoRA on a 4-bit nf4 base (bitsandbytes); merges only into the full-precision base."
    peft_type = "LORA"
    default_quantize = "nf4"

    def attach(self, model: Any, config: QLoraConfig) -> Any:
        return super().attach(_prepare(model), config)

    def load(self, model: Any, directory: str | Path, *, trainable: bool = False) -> Any:
        return super().load(_prepare(model) if trainable else model, directory, trainable=trainable)


def _prepare(model: Any) -> Any:
    """PEFT's k-bit preparation (freeze, norms in fp32); checkpointing is left to --gradient-checkpointing."""
    if not is_quantized(model):
        log.warning("qlora: the base is not quantized, so this trains plain LoRA; load it with --quantize nf4")
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(QLoraMethod())
