"""LoRA specifics: PEFT interop both ways, merge tolerance, refusal on a quantized base."""

from __future__ import annotations

import pytest
import torch

from adapterhub.adapters import load_adapter, save_adapter
from adapterhub.base import fingerprint, load_base
from adapterhub.errors import BaseMismatch, MergeError
from adapterhub.manager import PluginManager
from adapterhub.training import TrainOptions


@pytest.fixture(scope="module")
def lora_dir(tiny_base_dir, sentiment_dataset, tiny_tokenizer, tmp_path_factory):
    method = PluginManager(autoload=False).get_method("lora")
    config = method.make_config({"r": "4", "alpha": "8"})
    model = load_base(tiny_base_dir).model
    result = method.train(model, sentiment_dataset, config, TrainOptions(max_steps=10, lr=5e-3, batch_size=8, progress=False),
                          tokenizer=tiny_tokenizer)
    out = tmp_path_factory.mktemp("lora")
    save_adapter(method, result.model, config, out, base={"name": "tiny", "fingerprint": fingerprint(tiny_base_dir)})
    return out


def probe(tokenizer):
    return tokenizer(["<|user|>\nsentiment?\n\nbad day<|end|>\n<|assistant|>\n"], return_tensors="pt",
                     add_special_tokens=False)


def test_plain_peft_loads_it_with_the_same_logits(lora_dir, tiny_base_dir, tiny_tokenizer):
    from peft import PeftModel

    batch = probe(tiny_tokenizer)
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir).model, str(lora_dir))
    _, ours = load_adapter(load_base(tiny_base_dir).model, lora_dir, base_fingerprint=fingerprint(tiny_base_dir))
    with torch.no_grad():
        a, b, base = peft_model(**batch).logits, ours(**batch).logits, load_base(tiny_base_dir).model(**batch).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, base)


def test_config_values_reach_peft(lora_dir):
    import json

    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"


def test_loading_onto_another_base_is_refused(lora_dir, tmp_path, tiny_base_dir):
    from adapterhub.base import init_base

    other = init_base("tiny", tmp_path / "other", seed=7)
    with pytest.raises(BaseMismatch, match="trained on base tiny.*sha256:.*sha256:"):
        load_adapter(load_base(other).model, lora_dir, base_fingerprint=fingerprint(other))
    _, model = load_adapter(load_base(other).model, lora_dir, base_fingerprint=fingerprint(other), allow_base_mismatch=True)
    assert model is not None


def test_merge_into_a_quantized_base_is_refused_clearly(lora_dir, tiny_base_dir):
    method, model = load_adapter(load_base(tiny_base_dir, "nf4").model, lora_dir)
    with pytest.raises(MergeError, match="quantized base.*adapterhub merge"):
        method.merge(model)


def test_merge_refuses_non_finite_and_double_merge(lora_dir, tiny_base_dir):
    method, model = load_adapter(load_base(tiny_base_dir).model, lora_dir)
    method.merge(model)
    with pytest.raises(MergeError, match="already merged"):
        method.merge(model)
    method.unmerge(model)
    with pytest.raises(MergeError, match="nothing to unmerge"):
        method.unmerge(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(MergeError, match="not finite"):
        method.merge(model)
    assert torch.equal(layer.base_layer.weight, before)  # nothing written
