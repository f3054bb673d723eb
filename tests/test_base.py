"""Base models: the tiny preset, quantized loading, fingerprints, clear errors (the real preset and
dtypes: test_real_base.py)."""

from __future__ import annotations

import json

import pytest
import torch

from adapterhub.base import BNB_BLOCK, PRESETS, fingerprint, init_base, load_base
from adapterhub.errors import BaseModelError, ConfigError


def test_tiny_preset_rows_are_multiples_of_64(tiny_base_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_base_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if key.endswith("proj.weight"):
                assert shape[-1] % BNB_BLOCK == 0, f"{key} rows of length {shape[-1]}"
    config = json.loads((tiny_base_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_every_random_preset_is_quantizable():
    from transformers import LlamaConfig

    from adapterhub.architectures import check_quantizable
    from adapterhub.presets import RandomPreset

    random_presets = {name: p for name, p in PRESETS.items() if isinstance(p, RandomPreset)}
    assert {"tiny", "small"} <= set(random_presets)
    for p in random_presets.values():
        check_quantizable(LlamaConfig(hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                                      num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
                                      num_key_value_heads=p.num_key_value_heads, vocab_size=p.vocab_size))


def test_tokenizer_is_byte_level_with_chat_template(tiny_tokenizer):
    text = "héllo wörld ✓"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tiny_tokenizer.decode(ids) == text
    rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n") and "<|user|>\nhi<|end|>" in rendered


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_fingerprint_is_the_same_for_quantized_loads(tiny_base_dir, quantize):
    plain = load_base(tiny_base_dir, "none")
    quant = load_base(tiny_base_dir, quantize)
    assert plain.fingerprint == quant.fingerprint
    assert quant.quantize == quantize
    kind = "Linear4bit" if quantize == "nf4" else "Linear8bitLt"
    assert type(quant.model.model.layers[0].self_attn.q_proj).__name__ == kind
    ids = torch.tensor([[257, 70, 71, 72]])
    with torch.no_grad():
        a, b = plain.model(ids).logits, quant.model(ids).logits
    assert torch.isfinite(b).all() and not torch.equal(a, b)  # really quantized, still close-ish
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_fingerprint_differs_between_bases(tmp_path, tiny_base_dir):
    other = init_base("tiny", tmp_path / "other", seed=1)
    assert fingerprint(other) != fingerprint(tiny_base_dir)


def test_unquantizable_shapes_get_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterhub.base import build_tokenizer

    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=1376 // 4, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "odd")
    build_tokenizer().save_pretrained(tmp_path / "odd")
    with pytest.raises(BaseModelError, match=r"layer model\.layers\.0\.mlp\.down_proj has rows of 344.*multiple of 64"):
        load_base(tmp_path / "odd", "nf4")
    assert load_base(tmp_path / "odd", "none").model is not None


def test_missing_base_and_bad_preset(tmp_path):
    with pytest.raises(BaseModelError, match="not found"):
        load_base(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown base preset 'huge'"):
        init_base("huge", tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        init_base("tiny", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
