"""Behaviour of our own methods (adapter, bitfit, freeze, full) that the contract matrix does not cover."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adapterhub import AdapterFiles, ConfigError, MergeError
from adapterhub.manager import PluginManager
from adapterhub.training import TrainOptions


def method(name):
    return PluginManager(autoload=False).get_method(name)


def batch(tokenizer):
    enc = tokenizer(["<|user|>\nsentiment?\n\nthe good day<|end|>\n<|assistant|>\n", "abc"], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits.float()


def train(m, model, dataset, tokenizer, tmp_path, values=None, steps=6, lr=5e-3):
    options = TrainOptions(max_steps=steps, lr=lr, batch_size=8, progress=False, logging_steps=1, seed=0,
                           run_dir=str(tmp_path / "run"))
    return m.train(model, dataset, m.make_config(values or {}), options, tokenizer=tokenizer)


# -- adapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_variants_insert_modules_and_start_as_identity(variant, per_layer, tiny_model, tiny_tokenizer):
    from adapterhub.plugins.adapter import bottlenecks

    m = method("adapter")
    b = batch(tiny_tokenizer)
    base = logits(tiny_model, b)
    base_names = {n for n, _ in tiny_model.named_parameters()}
    m.attach(tiny_model, m.make_config({"variant": variant}))
    found = bottlenecks(tiny_model)
    layers = tiny_model.config.num_hidden_layers
    assert len(found) == per_layer * layers
    assert all(n.endswith("mlp.down_proj") or (variant == "houlsby" and n.endswith("self_attn.o_proj"))
               for n, _, _ in found)
    assert torch.equal(logits(tiny_model, b), base)  # up-projection starts at zero
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".bottleneck." in n for n in trainable)
    for _, _, module in found:  # with a non-zero up-projection the output must move
        torch.nn.init.normal_(module.up.weight)
    assert not torch.allclose(logits(tiny_model, b), base)
    m.detach(tiny_model)
    assert {n for n, _ in tiny_model.named_parameters()} == base_names
    assert torch.equal(logits(tiny_model, b), base)


def test_adapter_bottleneck_size_and_bad_options():
    m = method("adapter")
    assert m.make_config({"reduction": 32}).width(128) == 4
    assert m.make_config({"bottleneck_size": 12}).width(128) == 12
    with pytest.raises(ConfigError, match="activation"):
        m.make_config({"activation": "softmax"})
    with pytest.raises(ConfigError, match="reduction"):
        m.make_config({"reduction": 0})


@pytest.fixture(scope="module")
def nf4_adapter(tiny_base_dir, sentiment_dataset, tiny_tokenizer, tmp_path_factory):
    """An adapter trained on the nf4-quantized tiny base, saved."""
    from adapterhub.base import load_base

    torch.manual_seed(0)
    m = method("adapter")
    model = load_base(tiny_base_dir, "nf4").model
    result = train(m, model, sentiment_dataset, tiny_tokenizer, tmp_path_factory.mktemp("nf4"), steps=15)
    out = tmp_path_factory.mktemp("nf4-adapter")
    m.save(result.model, out)
    return result, out


def test_adapter_trains_on_nf4_base(nf4_adapter, tiny_base_dir, tiny_tokenizer):
    from adapterhub.base import load_base
    from adapterhub.plugins._peft import is_quantized

    result, out = nf4_adapter
    assert is_quantized(result.model)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    assert not getattr(result.model, "_hf_peft_config_loaded", False)  # the Trainer marker is cleared
    b = batch(tiny_tokenizer)
    loaded = method("adapter").load(load_base(tiny_base_dir, "nf4").model, out)
    assert torch.allclose(logits(loaded, b), logits(result.model, b), rtol=1e-5, atol=1e-5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["adapter_type"] == "bottleneck" and cfg["variant"] == "houlsby"


def test_bottleneck_form_matches_module(nf4_adapter, tiny_base_dir):
    from adapterhub.base import load_base
    from adapterhub.plugins.adapter import bottlenecks

    _, out = nf4_adapter
    m = method("adapter")
    model = m.load(load_base(tiny_base_dir, "none").model, out)
    form = m.serving_form(AdapterFiles.from_directory(out), model.config)
    modules = {n: b for n, _, b in bottlenecks(model)}
    assert set(form.layers) == set(modules) and len(modules) == 2 * model.config.num_hidden_layers
    h = torch.randn(3, 5, model.config.hidden_size)
    for name, (dw, db, uw, ub) in form.layers.items():
        assert uw.abs().max() > 0  # trained: the check below is not vacuous
        act = getattr(F, form.activation)
        expected = h + F.linear(act(F.linear(h, dw, db)), uw, ub)
        with torch.no_grad():
            assert torch.allclose(modules[name](h), expected, atol=1e-6)


# -- bitfit --------------------------------------------------------------------------------------


def test_bitfit_saves_only_biases_and_detach_restores(tiny_model, sentiment_dataset, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from adapterhub.plugins._modules import decoder_linears

    m = method("bitfit")
    b = batch(tiny_tokenizer)
    base = logits(tiny_model, b)
    linears = dict(decoder_linears(tiny_model, ["all-linear"]))
    result = train(m, tiny_model, sentiment_dataset, tiny_tokenizer, tmp_path)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bitfit.bias") for n in trainable)
    m.save(result.model, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert set(saved) == {f"{n}.bias" for n in linears}
    assert all(saved[f"{n}.bias"].shape == (lin.out_features,) for n, lin in linears.items())
    assert any(t.abs().max() > 0 for t in saved.values())
    m.detach(result.model)
    assert all(lin.bias is None for lin in linears.values())
    assert torch.equal(logits(result.model, b), base)


def test_bitfit_target_subset(tiny_model):
    m = method("bitfit")
    m.attach(tiny_model, m.make_config({"target_modules": "q_proj,mlp.down_proj"}))
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * tiny_model.config.num_hidden_layers
    assert all(n.endswith(("q_proj.bitfit.bias", "mlp.down_proj.bitfit.bias")) for n in trainable)
    with pytest.raises(ConfigError, match="nope_proj"):
        m.attach(method("bitfit").detach(tiny_model), m.make_config({"target_modules": "nope_proj"}))


# -- freeze --------------------------------------------------------------------------------------


def test_freeze_trains_only_top_layers(tiny_model, sentiment_dataset, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    m = method("freeze")
    top = tiny_model.config.num_hidden_layers - 1
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    result = train(m, tiny_model, sentiment_dataset, tiny_tokenizer, tmp_path, {"top_k_layers": 1})
    after = dict(result.model.named_parameters())
    layer_params = {n for n in before if f".layers.{top}." in n}
    assert {n for n, p in after.items() if p.requires_grad} == layer_params
    assert all(torch.equal(after[n], before[n]) for n in before if n not in layer_params)
    m.save(result.model, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert set(saved) == layer_params
    for n, delta in saved.items():  # the saved tensors are deltas, not weights
        assert torch.allclose(before[n] + delta, after[n].detach(), atol=1e-6)


def test_freeze_patterns_select_parameters(tiny_model):
    from adapterhub.plugins.freeze import selected_parameters

    m = method("freeze")
    assert selected_parameters(tiny_model, m.make_config({"top_k_layers": 0, "patterns": "lm_head.*"})) == ["lm_head.weight"]
    chosen = selected_parameters(tiny_model, m.make_config({"top_k_layers": 0, "patterns": r"re:layers\.0\..*norm"}))
    assert chosen == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]
    with pytest.raises(ConfigError, match="nothing to train"):
        m.make_config({"top_k_layers": 0})
    with pytest.raises(ConfigError, match="regex"):
        m.make_config({"patterns": "re:("})
    with pytest.raises(ConfigError, match="selects no parameter"):
        selected_parameters(tiny_model, m.make_config({"top_k_layers": 0, "patterns": "nothing*"}))


def test_freeze_merge_refuses_non_finite_and_keeps_weights(tiny_model, tiny_base_dir, tmp_path):
    from adapterhub.base import load_base
    from adapterhub.plugins._modules import write_adapter

    m = method("freeze")
    weight = tiny_model.lm_head.weight
    delta = torch.zeros_like(weight)
    delta[0, 0] = float("inf")
    write_adapter(tmp_path, "freeze", {"top_k_layers": 0, "patterns": ["lm_head.*"]}, {"lm_head.weight": delta})
    model = m.load(load_base(tiny_base_dir, "none").model, tmp_path)
    original = model.lm_head.weight.detach().clone()
    with pytest.raises(MergeError, match="non-finite"):
        m.merge(model)
    assert torch.equal(model.lm_head.weight, original)
    with pytest.raises(MergeError, match="nothing to unmerge"):
        m.unmerge(model)


def test_load_refuses_another_adapter_type(tiny_model, tmp_path):
    from adapterhub.plugins._modules import write_adapter

    write_adapter(tmp_path, "bitfit", {"target_modules": ["all-linear"]}, {})
    with pytest.raises(ConfigError, match="'bitfit' adapter, not 'freeze'"):
        method("freeze").load(tiny_model, tmp_path)


# -- full ----------------------------------------------------------------------------------------


def test_full_saves_a_model_dir_from_pretrained_loads(tiny_model, sentiment_dataset, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    m = method("full")
    b = batch(tiny_tokenizer)
    base = logits(tiny_model, b)
    result = train(m, tiny_model, sentiment_dataset, tiny_tokenizer, tmp_path, steps=4, lr=1e-3)
    expected = logits(result.model, b)
    m.save(result.model, tmp_path / "a")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    got = logits(plain, b)
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)


def test_full_loaded_adapter_resaves_fine_tuned_weights(tiny_base_dir, tiny_tokenizer, tmp_path):
    """Saving a *loaded* (unmerged) full adapter writes the fine-tuned weights, not the base."""
    from adapterhub.base import load_base

    m = method("full")
    tuned = load_base(tiny_base_dir, "none").model
    with torch.no_grad():
        tuned.model.norm.weight.mul_(1.5)
        tuned.lm_head.weight.add_(0.01)
    m.save(tuned, tmp_path / "a")
    b = batch(tiny_tokenizer)
    loaded = m.load(load_base(tiny_base_dir, "none").model, tmp_path / "a")
    assert torch.allclose(logits(loaded, b), logits(tuned, b), atol=1e-5)
    m.save(loaded, tmp_path / "b")
    again = m.load(load_base(tiny_base_dir, "none").model, tmp_path / "b")
    assert torch.allclose(logits(again, b), logits(tuned, b), atol=1e-5)
    m.merge(again)
    assert torch.equal(again.model.norm.weight, tuned.model.norm.weight)  # merge swaps the exact weights in
