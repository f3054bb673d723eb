"""One contract-test matrix over every registered method plugin.

Each method: trains a few steps and its loss drops; save -> load gives the same logits; merge gives
the logits of the unmerged forward and unmerge restores the base weights (or a clear NotMergeable);
bad config is rejected before training.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from adapterhub import ConfigError, NotMergeable
from adapterhub.manager import PluginManager
from adapterhub.training import TrainOptions

# Per-method training settings for the few-step "loss drops" check (defaults below).
CONTRACT_SETTINGS: dict[str, dict] = {
    "lora": {"lr": 5e-3},
    "ia3": {"lr": 5e-2},
    "prefix": {"lr": 2e-2},
    "prompt": {"lr": 5e-2},
    "ptuning": {"lr": 1e-2},
}
DEFAULT_SETTINGS = {"lr": 5e-3, "steps": 25}
# A value of the wrong type for some key of each method's config, for the bad-config check.
BAD_VALUE = "not-a-number"


def all_method_names() -> list[str]:
    return sorted(PluginManager().methods())


METHODS = all_method_names()


def settings(name: str) -> dict:
    return {**DEFAULT_SETTINGS, **CONTRACT_SETTINGS.get(name, {})}


def probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["<|user|>\nsentiment?\n\nthe good day<|end|>\n<|assistant|>\n", "abc def"], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) <= rel)


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's own parameters (by their base names), cloned."""
    from adapterhub.plugins._peft import base_module_name

    base = getattr(model, "get_base_model", lambda: model)()
    return {base_module_name(n): p.detach().clone() for n, p in base.named_parameters()}


@pytest.fixture(scope="module")
def trained(request, tiny_base_dir, sentiment_dataset, tiny_tokenizer, tmp_path_factory):
    """Train each method once per module; the tests below share the result."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            from adapterhub.base import load_base

            method = PluginManager().get_method(name)
            model = load_base(tiny_base_dir, getattr(method, "default_quantize", None) or "none").model
            config = method.make_config({})
            s = settings(name)
            options = TrainOptions(max_steps=s["steps"], lr=s["lr"], batch_size=8, progress=False,
                                   logging_steps=1, seed=0, run_dir=str(tmp_path_factory.mktemp(f"run-{name}")))
            result = method.train(model, sentiment_dataset, config, options, tokenizer=tiny_tokenizer)
            out = tmp_path_factory.mktemp(f"adapter-{name}")
            method.save(result.model, out)
            cache[name] = (method, config, result, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", METHODS)
def test_loss_drops(name, trained):
    _, _, result, _ = trained(name)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) >= 10, losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first * 0.9, f"{name}: loss did not drop ({first:.3f} -> {last:.3f})"


@pytest.mark.parametrize("name", METHODS)
def test_save_load_same_logits(name, trained, tiny_base_dir, tiny_tokenizer):
    from adapterhub.base import load_base

    method, _, result, out = trained(name)
    batch = probe_batch(tiny_tokenizer)
    expected = logits(result.model, batch)
    fresh = load_base(tiny_base_dir, getattr(method, "default_quantize", None) or "none").model
    loaded = method.load(fresh, out)
    loaded.eval()
    got = logits(loaded, batch)
    assert close(got, expected, 1e-5), f"{name}: logits differ after save -> load"
    base_logits = logits(load_base(tiny_base_dir, "none").model, batch)
    assert not close(got, base_logits, 1e-6), f"{name}: the loaded adapter changes nothing"


@pytest.mark.parametrize("name", METHODS)
def test_merge_unmerge(name, trained, tiny_base_dir, tiny_tokenizer):
    from adapterhub.base import load_base

    method, _, _, out = trained(name)
    model = method.load(load_base(tiny_base_dir, "none").model, out)
    model.eval()
    batch = probe_batch(tiny_tokenizer)
    unmerged = logits(model, batch)
    before = base_weights(model)
    if not method.capabilities.mergeable:
        with pytest.raises(NotMergeable, match=name):
            method.merge(model)
        with pytest.raises(NotMergeable, match=name):
            method.unmerge(model)
        return
    method.merge(model)
    assert close(logits(model, batch), unmerged, 1e-4), f"{name}: merged logits differ from the unmerged forward"
    changed = base_weights(model)
    assert any(not torch.equal(changed[k], before[k]) for k in before if k in changed), f"{name}: merge changed no weight"
    method.unmerge(model)
    after = base_weights(model)
    for key, value in before.items():
        if key in after and value.numel():  # AdaLoRA may prune a matrix to rank 0 (empty tensors)
            assert (after[key] - value).abs().max() <= 1e-6, f"{name}: unmerge did not restore {key}"
    assert close(logits(model, batch), unmerged, 1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_bad_config_rejected(name):
    method = PluginManager().get_method(name)
    with pytest.raises(ConfigError, match="no key"):
        method.make_config({"definitely_not_a_key": 1})
    typed = [f for f in dataclasses.fields(method.config_class) if f.type in ("int", "float", int, float)]
    if typed:
        with pytest.raises(ConfigError, match=typed[0].name):
            method.make_config({typed[0].name: BAD_VALUE})


@pytest.mark.parametrize("name", METHODS)
def test_declares_contract(name):
    method = PluginManager().get_method(name)
    assert method.name == name
    assert method.description
    for row in method.config_class.describe():
        assert row["help"], f"{name}: config field {row['name']} has no help text"
