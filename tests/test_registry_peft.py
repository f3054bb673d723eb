"""A real PEFT adapter goes in with ``import`` and comes out with ``export`` loadable by plain PEFT."""

from __future__ import annotations

import json

import pytest

from adapterhub.errors import BaseMismatch
from adapterhub.registry import check_base, export_dir, import_dir, open_registry


def test_plain_peft_lora_round_trips_through_the_registry(tmp_path, tiny_base_dir):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from adapterhub.base import fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()  # PEFT starts B at zero; make the adapter non-trivial
    trained = {k: v.clone() for k, v in peft.get_peft_model_state_dict(lora).items()}
    lora.save_pretrained(tmp_path / "peft_out")
    assert not list((tmp_path / "peft_out").glob("*.bin"))

    store = open_registry(tmp_path / "registry")
    manifest = import_dir(store, "sentiment", tmp_path / "peft_out", base=tiny_base_dir)
    assert manifest.method == "lora" and manifest.method_config["r"] == 4
    assert manifest.base_fingerprint == fingerprint(tiny_base_dir)
    assert check_base(manifest, fingerprint(tiny_base_dir))
    with pytest.raises(BaseMismatch):
        check_base(manifest, "sha256:" + "0" * 64)

    out = export_dir(store, "sentiment@1", tmp_path / "exported")
    assert json.loads((out / "adapterhub.json").read_text())["base"]["fingerprint"] == manifest.base_fingerprint
    fresh = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    loaded = peft.PeftModel.from_pretrained(fresh, out)
    state = peft.get_peft_model_state_dict(loaded)
    assert state.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
