"""One contract-test matrix over every registered method plugin.

Each method: trains a few steps and its loss drops; save -> load gives the same logits; merge gives
the logits of the unmerged forward and unmerge restores the base weights (or a clear NotMergeable);
bad config is rejected before training. Its capability flags are checked against what it does, so
no flag can drift from the behaviour: ``mergeable`` (merge works, else NotMergeable),
``quantized_base`` (attach, a training step and load on an nf4 base work, else a clear ConfigError),
``mixed_batch`` (the serving hook returns a form of a kind the server applies, and the server takes
it) and ``composable`` (the server composes it with some other adapter).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapterhub import AdapterFiles, ConfigError, NotMergeable
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
    """mergeable: merge folds the adapter in (same logits, changed weights), unmerge restores the
    base; without the flag both raise NotMergeable naming the method."""
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
def test_quantized_base_flag(name, trained, tiny_base_dir, tiny_tokenizer):
    """quantized_base: attach, a training step and load on an nf4 base work; else both are refused
    with a ConfigError that says so (not some error from deep inside)."""
    from adapterhub.base import load_base
    from adapterhub.plugins._peft import is_quantized

    method, config, _, out = trained(name)
    nf4 = lambda: load_base(tiny_base_dir, "nf4").model  # noqa: E731
    if not method.capabilities.quantized_base:
        with pytest.raises(ConfigError, match="quantized base"):
            method.attach(nf4(), config)
        with pytest.raises(ConfigError, match="quantized base"):
            method.load(nf4(), out)
        return
    model = method.attach(nf4(), config)
    assert is_quantized(model)
    batch = probe_batch(tiny_tokenizer)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), \
        f"{name}: a step on the nf4 base does not reach the adapter"
    loaded = method.load(nf4(), out)
    got = logits(loaded.eval(), batch)
    assert torch.isfinite(got).all() and not close(got, logits(nf4(), batch), 1e-6), f"{name}: loads on nf4 as a no-op"


def served_form(method, directory, base):
    """What the server does with a method's adapter: the form its hook returns, and the slot pool's
    ``Served`` (None on the slow path)."""
    from adapterhub.serve.kinds import kind_of
    from adapterhub.serve.slot_pool import SlotPool

    form = method.serving_form(AdapterFiles.from_directory(directory), base.config)
    if form is None or kind_of(form) is None:
        return form, None
    return form, SlotPool(model=base).admit(f"{method.name}@1", form)


@pytest.mark.parametrize("name", METHODS)
def test_mixed_batch_flag(name, trained, tiny_base_dir):
    """mixed_batch: the serving hook returns a form of a kind the server applies, which its slot pool
    takes; without the flag, no form (the server would not ask for one)."""
    from adapterhub.base import load_base
    from adapterhub.serve.kinds import kind_of

    method, _, _, out = trained(name)
    form, served = served_form(method, out, load_base(tiny_base_dir, "none").model)
    assert (served is not None) == method.capabilities.mixed_batch, (
        f"{name}: declares mixed_batch={method.capabilities.mixed_batch} but its serving hook returned "
        f"{type(form).__name__} (kind {getattr(kind_of(form), 'name', None)})")
    if served is not None:
        assert served.kind is kind_of(form)


@pytest.mark.parametrize("name", METHODS)
def test_composable_flag(name, trained, tiny_base_dir):
    """composable: the server composes the method's adapter with an adapter of at least one kind
    (the slow path composes with nothing, so composable needs mixed_batch)."""
    from types import SimpleNamespace

    from adapterhub.base import load_base
    from adapterhub.errors import LimitExceeded
    from adapterhub.serve.kinds import KINDS, check_composition
    from adapterhub.serve.slot_pool import Served

    method, _, _, out = trained(name)
    _, served = served_form(method, out, load_base(tiny_base_dir, "none").model)
    entry = SimpleNamespace(key=f"{name}@1", method=method, served=served)
    company = []
    for kind in KINDS:
        other = SimpleNamespace(key=f"{kind.name}@1", method=None, served=Served(kind))
        try:
            check_composition([(entry, 1.0), (other, 1.0)])
        except LimitExceeded:
            continue
        company.append(kind.name)
    assert bool(company) == method.capabilities.composable, (
        f"{name}: declares composable={method.capabilities.composable}; the server composes it with {company or 'nothing'}")


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
