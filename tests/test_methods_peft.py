"""The PEFT-backed methods beyond the contract matrix: serving forms, PEFT compatibility, QLoRA on
nf4, AdaLoRA's budget schedule, LoRA+ learning rates, and merging around a quantized base.

Adapters here are attached and then given random non-zero weights (instead of trained), so the
checks are about the arithmetic, run in seconds, and cannot pass with an identity adapter.
"""

from __future__ import annotations

import json

import pytest
import torch

from adapterhub import AdapterFiles, MergeError
from adapterhub.manager import PluginManager
from adapterhub.training import TrainOptions

PEFT_METHODS = ["qlora", "dora", "adalora", "loraplus", "ia3", "prefix", "prompt", "ptuning"]
SOFT_PROMPTS = {"prompt", "ptuning"}  # PEFT returns logits for their virtual tokens too


def method_named(name):
    return PluginManager(autoload=False).get_method(name)


def probe(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["<|user|>\nsentiment?\n\nthe good day<|end|>\n<|assistant|>\n", "abc def"],
                    return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4, what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    assert err <= rel, f"{what}: relative difference {err:.2e} > {rel:.0e}"


def load_base(base_dir, quantize="none"):
    from adapterhub.base import load_base as load

    return load(base_dir, quantize).model


def random_adapter(method, base_dir, out, quantize="none"):
    """Attach a fresh adapter, give it random non-zero weights, save it; returns the directory."""
    model = method.attach(load_base(base_dir, quantize), method.make_config({}), **(
        {"total_step": 20} if method.name == "adalora" else {}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * (0.02 if "embedding" in name else 0.2))
    method.save(model, out)
    return out


# -- serving forms ------------------------------------------------------------------------------


def apply_form_by_hand(base, form, batch) -> torch.Tensor:
    """The reference application of a serving form to a plain base model: hooks / past_key_values."""
    from transformers import DynamicCache

    from adapterhub.serving_forms import DoraForm, LoraForm, PrefixForm, ScaleForm, SoftPromptForm

    modules = dict(base.named_modules())
    handles = []
    try:
        if isinstance(form, LoraForm):
            for name, (a, b) in form.deltas.items():
                b = b.float() * form.scales.get(name, 1.0)
                handles.append(modules[name].register_forward_hook(
                    lambda m, args, out, a=a.float(), b=b: out + (args[0].float() @ a.T @ b.T).to(out.dtype)))
        elif isinstance(form, DoraForm):  # c * (W x + s B A x), c = m / ||W + s B A||_row (no bias here)
            for name, (a, b) in form.lora.deltas.items():
                a, b = a.float(), b.float() * form.lora.scales.get(name, 1.0)
                c = form.magnitudes[name].float() / (modules[name].weight.float() + b @ a).norm(p=2, dim=1)
                handles.append(modules[name].register_forward_hook(
                    lambda m, args, out, a=a, b=b, c=c: (c * (out.float() + args[0].float() @ a.T @ b.T)).to(out.dtype)))
        elif isinstance(form, ScaleForm):
            for name, s in form.input_scales.items():
                handles.append(modules[name].register_forward_pre_hook(lambda m, args, s=s: (args[0] * s,)))
            for name, s in form.output_scales.items():
                handles.append(modules[name].register_forward_hook(lambda m, args, out, s=s: out * s))
        elif isinstance(form, SoftPromptForm):  # virtual tokens in front; their logits dropped
            rows, tokens = batch["input_ids"].shape[0], form.embeddings.shape[0]
            embeds = base.get_input_embeddings()(batch["input_ids"])
            embeds = torch.cat([form.embeddings.to(embeds.dtype).expand(rows, -1, -1), embeds], 1)
            mask = torch.cat([torch.ones(rows, tokens, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1)
            with torch.no_grad():
                return base(inputs_embeds=embeds, attention_mask=mask).logits[:, tokens:].float()
        elif isinstance(form, PrefixForm):
            rows, tokens = batch["input_ids"].shape[0], form.keys.shape[2]
            cache = DynamicCache()
            for layer in range(form.keys.shape[0]):
                cache.update(form.keys[layer].expand(rows, -1, -1, -1), form.values[layer].expand(rows, -1, -1, -1), layer)
            mask = torch.cat([torch.ones(rows, tokens, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1)
            with torch.no_grad():
                return base(input_ids=batch["input_ids"], attention_mask=mask, past_key_values=cache).logits.float()
        else:
            raise AssertionError(f"unknown serving form {type(form).__name__}")
        return logits(base, batch)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_serving_form_reproduces_peft_logits(name, tiny_base_dir, tiny_tokenizer, tmp_path):
    method = method_named(name)
    quantize = method.default_quantize or "none"
    directory = random_adapter(method, tiny_base_dir, tmp_path / name, quantize)
    form = method.serving_form(AdapterFiles.from_directory(directory), load_base(tiny_base_dir).config)
    assert (form is not None) == method.capabilities.mixed_batch, f"{name}: mixed_batch flag disagrees with serving_form"
    if form is None:
        return
    batch = probe(tiny_tokenizer)
    peft_model = method.load(load_base(tiny_base_dir, quantize), directory)
    want = logits(peft_model, batch)
    base = load_base(tiny_base_dir, quantize)
    assert not torch.allclose(logits(base, batch), want, atol=1e-3), f"{name}: the random adapter changes nothing"
    assert_close(apply_form_by_hand(base, form, batch), want, 1e-4, f"{name} serving form")


def test_prefix_form_with_projection_matches(tiny_base_dir, tiny_tokenizer, tmp_path):
    """With prefix_projection the MLP output is what PEFT saves; the form must use it, not the embedding."""
    method = method_named("prefix")
    model = method.attach(load_base(tiny_base_dir), method.make_config({"prefix_projection": True,
                                                                         "encoder_hidden_size": 32}))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    method.save(model, tmp_path)
    batch = probe(tiny_tokenizer)
    want = logits(method.load(load_base(tiny_base_dir), tmp_path), batch)
    form = method.serving_form(AdapterFiles.from_directory(tmp_path), None)
    cfg = load_base(tiny_base_dir).config
    assert form.keys.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, 16,
                               cfg.hidden_size // cfg.num_attention_heads)
    assert_close(apply_form_by_hand(load_base(tiny_base_dir), form, batch), want, 1e-4, "projected prefix")


# -- PEFT's own format --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_plain_peft_loads_saved_adapter(name, tiny_base_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    from adapterhub.adapters import method_for_directory

    method = method_named(name)
    directory = random_adapter(method, tiny_base_dir, tmp_path / name)
    files = sorted(p.name for p in directory.iterdir() if p.name != "README.md")  # PEFT writes a model card
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files
    assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] == method.peft_type
    batch = probe(tiny_tokenizer)
    ours = logits(method.load(load_base(tiny_base_dir), directory), batch)
    plain = logits(PeftModel.from_pretrained(load_base(tiny_base_dir), str(directory)), batch)
    if name in SOFT_PROMPTS:  # ours lines logits up with input_ids; PEFT's include the virtual tokens
        assert plain.shape[1] == ours.shape[1] + method.make_config({}).num_virtual_tokens
        plain = plain[:, -ours.shape[1]:]
    assert_close(ours, plain, 1e-6, f"{name}: adapterhub load vs plain PEFT load")
    # A plain PEFT directory (no adapterhub.json) finds a method that reads it back the same.
    found = method_for_directory(directory, PluginManager(autoload=False))
    assert found.peft_type == method.peft_type
    assert_close(logits(found.load(load_base(tiny_base_dir), directory), batch), ours, 1e-6, f"{name} via peft_type")


@pytest.mark.parametrize("name", ["prefix", "prompt", "ptuning"])
def test_prompt_learning_detach_returns_the_base(name, tiny_base_dir):
    method = method_named(name)
    base = load_base(tiny_base_dir)
    model = method.attach(base, method.make_config({}))
    assert method.detach(model) is base


# -- QLoRA, merging and the quantized base -------------------------------------------------------


def test_qlora_trains_on_nf4(tiny_base_dir, sentiment_dataset, tiny_tokenizer, tmp_path):
    import bitsandbytes as bnb

    method = method_named("qlora")
    assert method.default_quantize == "nf4"
    model = load_base(tiny_base_dir, method.default_quantize)
    options = TrainOptions(max_steps=12, lr=5e-3, batch_size=8, progress=False, logging_steps=1, seed=0,
                           run_dir=str(tmp_path))
    result = method.train(model, sentiment_dataset, method.make_config({}), options, tokenizer=tiny_tokenizer)
    q_proj = result.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    b = q_proj.lora_B["default"].weight
    assert b.dtype == torch.float32 and b.abs().max() > 0, "LoRA B did not train (it starts at zero)"
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3]), losses


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merge_into_nf4_base_is_refused(name, tiny_base_dir, tmp_path):
    method = method_named(name)
    directory = random_adapter(method, tiny_base_dir, tmp_path / name, "nf4")
    model = method.load(load_base(tiny_base_dir, "nf4"), directory)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match=rf"{name}: refusing to merge into a quantized base.*adapterhub merge"):
        method.merge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a refused merge changed weights"


def test_adapterhub_merge_writes_full_precision_model_from_qlora(tiny_base_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint
    from adapterhub.pipeline import merge_to_directory

    method = method_named("qlora")
    raw = random_adapter(method, tiny_base_dir, tmp_path / "raw", "nf4")
    adapter_dir = tmp_path / "adapter"
    trained = method.load(load_base(tiny_base_dir, "nf4"), raw)
    save_adapter(method, trained, method.make_config({}), adapter_dir,
                 base={"name": str(tiny_base_dir), "fingerprint": fingerprint(tiny_base_dir)})

    out = merge_to_directory(str(adapter_dir), str(tiny_base_dir), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert getattr(merged.config, "quantization_config", None) is None
    batch = probe(tiny_tokenizer)
    want = logits(method.load(load_base(tiny_base_dir), adapter_dir), batch)  # fp32 base + adapter
    assert not torch.allclose(logits(load_base(tiny_base_dir), batch), want, atol=1e-3)
    assert_close(logits(merged, batch), want, 1e-4, "merged model vs fp32 base + qlora adapter")


# -- AdaLoRA's budget schedule and LoRA+'s learning rates ------------------------------------------


def test_adalora_schedule_follows_the_trainer_and_prunes_ranks(tiny_base_dir, sentiment_dataset, tiny_tokenizer,
                                                              tmp_path):
    from adapterhub.plugins.adalora import planned_steps

    method = method_named("adalora")
    config = method.make_config({"r": 6, "target_r": 2})
    data = [sentiment_dataset[i] for i in range(48)]
    options = TrainOptions(epochs=2, lr=5e-3, batch_size=8, progress=False, logging_steps=1, seed=0,
                           run_dir=str(tmp_path / "run"))
    assert planned_steps(options, len(data)) == 12
    result = method.train(load_base(tiny_base_dir), data, config, options, tokenizer=tiny_tokenizer)
    model = result.model
    peft_config = model.peft_config["default"]
    assert result.metrics["global_step"] == 12
    assert (peft_config.total_step, peft_config.tinit, peft_config.tfinal) == (12, 1, 3)
    # update_and_allocate ran: a rank pattern exists and the kept ranks meet the final budget
    pattern = peft_config.rank_pattern
    assert pattern, "AdaLoRA never allocated ranks (update_and_allocate did not run)"
    kept = sum(sum(mask) for mask in pattern.values())
    assert kept == config.target_r * len(pattern) < config.r * len(pattern)
    method.save(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    ranks = [t.shape[0] for k, t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items()
             if ".lora_E" in k]
    assert sum(ranks) == kept and len(set(ranks)) > 1, f"saved ranks {ranks} were not pruned per matrix"


def test_adalora_needs_a_step_count(tiny_base_dir):
    """The PEFT config is never built without a count; a bare attach (docs, inspection) uses a
    placeholder that training replaces with the Trainer's own count (see the schedule test)."""
    from adapterhub import ConfigError
    from adapterhub.plugins.adalora import PLACEHOLDER_TOTAL_STEP

    method = method_named("adalora")
    with pytest.raises(ConfigError, match="total"):
        method.peft_config(method.make_config({}))
    model = method.attach(load_base(tiny_base_dir), method.make_config({}))
    assert model.peft_config["default"].total_step == PLACEHOLDER_TOTAL_STEP


def test_loraplus_optimizer_gives_b_ratio_times_a_lr(tiny_base_dir, sentiment_dataset, tiny_tokenizer, tmp_path):
    from transformers import TrainerCallback

    method = method_named("loraplus")
    config = method.make_config({"loraplus_lr_ratio": 8})
    seen: list[tuple[float, float]] = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            lrs = {}
            for group in optimizer.param_groups:
                kinds = {("B" if "lora_B" in names[id(p)] else "A") for p in group["params"]}
                assert len(kinds) == 1, f"a group mixes A and B parameters: {kinds}"
                lrs[kinds.pop()] = group["lr"]
            seen.append((lrs["A"], lrs["B"]))

    options = TrainOptions(max_steps=3, lr=1e-3, batch_size=8, progress=False, logging_steps=1, seed=0,
                           run_dir=str(tmp_path))
    method.train(load_base(tiny_base_dir), sentiment_dataset, config, options, tokenizer=tiny_tokenizer,
                 callbacks=[Watch()])
    assert len(seen) == 3 and seen[0][0] > 0  # the linear schedule reaches 0 after the last step
    for a_lr, b_lr in seen:
        assert b_lr == pytest.approx(8 * a_lr)


@pytest.mark.parametrize("name, values", [("ptuning", {}), ("prefix", {"prefix_projection": True})])
def test_resuming_an_encoder_trained_prompt_is_refused(name, values, tiny_base_dir, tmp_path):
    """PEFT saves only the encoder's output; resuming would stack a fresh random encoder on it."""
    from adapterhub import ConfigError

    method = method_named(name)
    method.save(method.attach(load_base(tiny_base_dir), method.make_config(values)), tmp_path)
    with pytest.raises(ConfigError, match="cannot be trained further"):
        method.load(load_base(tiny_base_dir), tmp_path, trainable=True)
    assert method.load(load_base(tiny_base_dir), tmp_path) is not None  # serving it is fine


def test_prefix_starts_as_the_bases_keys_values_for_init_text(tiny_base_dir, tiny_tokenizer):
    """init=activations (the default): PEFT's own prefix (get_prompt) is the frozen base's cache for
    init_text, repeated to length, layer by layer; init=random is PEFT's table, unchanged."""
    method = method_named("prefix")
    text = "the good day"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = 2 * len(ids) + 1  # repeated and cut
    base = load_base(tiny_base_dir)
    with torch.no_grad():
        want = base(input_ids=torch.tensor([(ids * 3)[:tokens]]), use_cache=True).cache
    model = method.attach(base, method.make_config({"num_virtual_tokens": tokens, "init_text": text}))
    with torch.no_grad():
        got = model.get_prompt(batch_size=1)
    got_layers = [(layer.keys, layer.values) for layer in got.layers] if hasattr(got, "layers") else list(got)
    assert len(got_layers) == len(want.layers)
    for (k, v), layer in zip(got_layers, want.layers):
        assert_close(k, layer.keys, what="prefix keys")
        assert_close(v, layer.values, what="prefix values")

    from peft import get_peft_model

    config = method.make_config({"num_virtual_tokens": tokens, "init": "random"})
    torch.manual_seed(0)
    ours = method.attach(load_base(tiny_base_dir), config).prompt_encoder["default"].embedding.weight
    torch.manual_seed(0)
    peft = get_peft_model(load_base(tiny_base_dir), method.peft_config(config)).prompt_encoder["default"].embedding.weight
    assert torch.equal(ours, peft)


@pytest.mark.parametrize("values, match", [({"init": "text"}, "init='text'"), ({"init_text": " "}, "init_text")])
def test_prefix_init_is_validated(values, match):
    from adapterhub import ConfigError

    with pytest.raises(ConfigError, match=match):
        method_named("prefix").make_config(values)
