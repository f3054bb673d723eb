"""Sparse fine-tuning: train a fixed sparse subset of each targeted weight matrix, PEFT's SHiRA
(Sparse High Rank Adapters, Bhardwaj et al., 2024).

Each targeted Linear ``W [out, in]`` gets ``r * (in + out)`` trainable entries (exactly as many as
a rank-``r`` LoRA on it) at positions fixed by a mask when the adapter is attached: the update is
``W + S`` with ``S`` sparse but of high rank. ``mask_type`` picks the positions: ``random``
(PEFT's own, seeded by ``mask_seed``) or ``magnitude`` (the entries of largest ``|W|``, the
paper's SHiRA-WM: "the important parameters" by the cheapest measure). Either way the positions
are saved beside the values (``shira_indices``), so a plain ``PeftModel.from_pretrained`` loads
the adapter without knowing how the mask was chosen.

Merge adds ``S`` to ``W``; unmerge subtracts the same ``S``. Served per row of a mixed batch as
:class:`~adapterhub.serving_forms.SparseForm` (each row's ``x[:, cols] * values`` added at ``rows``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

import adapterhub
from adapterhub import AdapterFiles, Capabilities, ConfigError, MethodConfig, option
from adapterhub import architectures as A
from adapterhub.plugins import _modules as M
from adapterhub.plugins._peft import PeftMethod, base_module_name, is_quantized
from adapterhub.serving_forms import SparseForm

MASKS = ("random", "magnitude")


@dataclasses.dataclass
class SparseConfig(MethodConfig):
    method_name = "sparse"

    r: int = option(8, "trainable entries per targeted Linear [out, in]: r * (in + out), as many as a rank-r LoRA "
                       "(the update itself is of high rank); at most in * out / (in + out)")
    mask_type: str = option("random", "which entries train: random (seeded by mask_seed) or magnitude "
                                      "(the base weight's largest |W|)", choices=MASKS)
    mask_seed: int = option(0, "seed of the random mask (the same for every module)")
    target_modules: list[str] = option(["all-linear"], "Linear layers to sparsely update ('all-linear': every "
                                                        "Linear of the decoder layers, or suffixes: q_proj,v_proj)")

    def validate(self) -> None:
        if not 1 <= self.r <= 4096:
            raise ConfigError(f"sparse config: r={self.r} must be between 1 and 4096 (entries per module: "
                              "r * (in + out)), e.g. --set r=8")
        if self.mask_seed < 0:
            raise ConfigError(f"sparse config: mask_seed={self.mask_seed} must be >= 0, e.g. --set mask_seed=0")
        if not self.target_modules:
            raise ConfigError("sparse config: target_modules is empty; e.g. --set target_modules=all-linear")


def magnitude_mask(base_layer: torch.nn.Module, r: int, **_: Any) -> torch.Tensor:
    """The ``r * (in + out)`` entries of largest ``|W|`` (PEFT's mask-function signature)."""
    weight = base_layer.weight
    out_features, in_features = weight.shape
    chosen = weight.detach().abs().flatten().topk(r * (in_features + out_features)).indices
    mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    mask[chosen] = 1
    return mask.view_as(weight)


class SparseMethod(PeftMethod):
    name = "sparse"
    # Measured on SmolLM2-135M-Instruct (bench/sparse_vs_lora.py, method_accuracy's data and options):
    # 160 examples, batch 8, these options (60 steps): sentiment 1.00, flip 0.98 (LoRA r=8, as many
    # trainable parameters: 0.94); lr 1e-2 reached a like training loss by step 50 (0.006 vs 0.008).
    recommended_options = {"lr": 3e-3, "epochs": 3.0, "warmup_steps": 5}
    config_class = SparseConfig
    # On a 4-bit/8-bit base PEFT adds x @ S.T beside the quantized layer (a random mask only: a
    # magnitude mask reads W). Served per row on any base (the delta is added after the module),
    # composable with every kind that adds to a module's output.
    capabilities = Capabilities(mergeable=True, quantized_base=True, mixed_batch=True, composable=True)
    foldable_bottom = True  # its change adds to the layer's output: merged under a top, as the server composes it
    description = "Sparse fine-tuning: a fixed sparse set of entries of each Linear weight trains (PEFT SHiRA)."
    peft_type = "SHIRA"

    def attach(self, model: Any, config: SparseConfig) -> Any:
        from peft import get_peft_model

        if config.mask_type == "magnitude" and is_quantized(model):
            raise ConfigError("sparse config: mask_type=magnitude reads the base weights, which a quantized "
                              "base does not hold in full; use --set mask_type=random, or load the base with "
                              "--quantize none")
        check_sizes(model, config)
        return get_peft_model(model, self.peft_config(config))

    def peft_config(self, config: SparseConfig) -> Any:
        from peft import ShiraConfig

        targets = config.target_modules
        with warnings.catch_warnings():  # PEFT warns about any mask_type but its own, then takes our mask_fn
            warnings.simplefilter("ignore")
            peft_config = ShiraConfig(r=config.r, mask_type=config.mask_type, random_seed=config.mask_seed,
                                      target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                                      task_type="CAUSAL_LM")
        if config.mask_type == "magnitude":
            peft_config.mask_fn = magnitude_mask
        return peft_config

    def serving_form(self, files: AdapterFiles, base_config: Any) -> Any:
        return sparse_form(files)


def check_sizes(model: Any, config: SparseConfig) -> None:
    """Refuse targets that match nothing, and an ``r`` that asks more entries than a module has,
    naming the module and the largest ``r`` it takes (PEFT's own error names neither)."""
    targets = M.decoder_linears(model, config.target_modules)
    if not targets:
        raise ConfigError(f"sparse config: target_modules={config.target_modules} matches no Linear layer in the "
                          "decoder layers; use all-linear or names such as q_proj")
    for name, module in targets:
        in_features, out_features = A.linear_shape(module)
        if config.r * (in_features + out_features) > in_features * out_features:
            largest = in_features * out_features // (in_features + out_features)
            raise ConfigError(
                f"sparse config: r={config.r} asks {config.r * (in_features + out_features)} entries of {name} "
                f"[{out_features}, {in_features}], more than it has; use --set r={largest} or less, or leave this "
                "module out of target_modules")


def sparse_form(files: AdapterFiles) -> SparseForm:
    """The saved (indices, values) per base module; PEFT's scaling is 1 (it stores none)."""
    state = files.tensor_views("adapter_model.safetensors")
    deltas = {}
    for key in state:
        if key.endswith(".shira_weight"):
            module = key[: -len(".shira_weight")]
            indices = f"{module}.shira_indices"
            if indices not in state:
                raise KeyError(f"adapter_model.safetensors has {key} but no {indices}")
            deltas[base_module_name(module)] = (state[indices], state[key])
    return SparseForm(deltas)


@adapterhub.hookimpl
def adapterhub_register_methods(register):
    register(SparseMethod())
