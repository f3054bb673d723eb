"""A registry of adapters of four kinds on the tiny base, and their offline greedy answers.

Shared by the gRPC and HTTP server tests (one session-scoped registry, see conftest): LoRA on two
tasks, a bottleneck adapter, IA3 and prefix tuning, plus an adapter claiming another base and one
whose method has no serving form. Offline references: plain ``peft.PeftModel.from_pretrained`` +
``generate`` for LoRA, the method's own ``load`` for the others, alone, batch of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MAX_NEW = 8


def chat(text: str) -> list[tuple[str, str]]:
    return [("user", f"sentiment?\n\n{text}")]


def build_mixed_world(root: Path, tiny_base_dir: Path, tiny_tokenizer) -> dict:
    """A registry with lora (x2 tasks), bottleneck adapter, ia3, prefix, bitfit, dora, prompt-tuning
    and p-tuning adapters (+ variants)."""
    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.data import load_dataset
    from adapterhub.manager import PluginManager
    from adapterhub.registry import open_registry
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions

    store = open_registry(root / "registry")
    manager = PluginManager(autoload=False)
    dirs = {}
    for task, method_name, data_task, lr in [("senti", "lora", "sentiment", 5e-3), ("rev", "lora", "reverse", 1e-2),
                                             ("bottle", "adapter", "sentiment", 5e-3), ("scale", "ia3", "sentiment", 3e-2),
                                             ("pre", "prefix", "sentiment", 3e-2), ("bias", "bitfit", "sentiment", 3e-2),
                                             ("dora", "dora", "reverse", 1e-2), ("soft", "prompt", "sentiment", 1e-1),
                                             ("ptune", "ptuning", "reverse", 3e-2)]:
        train, _ = write_split(data_task, root / f"data-{task}", n_train=48, n_test=4)
        dataset = load_dataset(train, tiny_tokenizer, max_length=64)
        method = manager.get_method(method_name)
        config = method.make_config({})
        options = TrainOptions(max_steps=12, lr=lr, batch_size=8, progress=False, seed=0,
                               run_dir=str(root / f"run-{task}"))
        result = method.train(load_base(tiny_base_dir, "none").model, dataset, config, options, tokenizer=tiny_tokenizer)
        out = save_adapter(method, result.model, config, root / f"adapter-{task}",
                           base={"name": "tiny", "fingerprint": fingerprint(tiny_base_dir)})
        store.publish(task, out)
        dirs[task] = out
    store.set_tag("senti@1", "prod")
    # an adapter that claims another base
    other = root / "adapter-other"
    shutil.copytree(dirs["senti"], other)
    meta = json.loads((other / "adapterhub.json").read_text())
    meta["base"]["fingerprint"] = "sha256:" + "0" * 64
    (other / "adapterhub.json").write_text(json.dumps(meta))
    store.publish("otherbase", other)
    # the same LoRA weights under a method name whose plugin has no serving form (slow path)
    noform = root / "adapter-noform"
    shutil.copytree(dirs["senti"], noform)
    meta = json.loads((noform / "adapterhub.json").read_text())
    meta["method"] = "lora-noform"
    (noform / "adapterhub.json").write_text(json.dumps(meta))
    store.publish("noform", noform)
    return {"root": root, "store": store, "dirs": dirs, "registry": root / "registry"}


def offline_tokens(base_dir, tokenizer, messages, setup, max_new: int = MAX_NEW, *, quantize: str = "nf4",
                   dtype: str = "auto", device: str | None = None) -> list[int]:
    """Greedy generation of one request alone on a fresh base (nf4 by default) with ``setup(model)`` applied."""
    from adapterhub.base import load_base
    from adapterhub.data import render_prompt

    model = setup(load_base(base_dir, quantize, dtype=dtype, device=device).model)
    model.eval()
    text = render_prompt(tokenizer, [{"role": r, "content": c} for r, c in messages])
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def offline_tokens_by_forward(base_dir, tokenizer, messages, setup, max_new: int = MAX_NEW, *, quantize: str = "nf4",
                              dtype: str = "auto", device: str | None = None) -> list[int]:
    """Greedy decoding by repeated full forward passes of the offline model (no generate()).

    Used for prefix tuning: with peft 0.21 + transformers 5, PEFT's ``generate`` drops the prefix
    on this setup (it returns the base model's tokens), while PEFT's ``forward`` applies it.
    """
    from adapterhub.base import load_base
    from adapterhub.data import render_prompt

    model = setup(load_base(base_dir, quantize, dtype=dtype, device=device).model)
    model.eval()
    text = render_prompt(tokenizer, [{"role": r, "content": c} for r, c in messages])
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    new: list[int] = []
    with torch.inference_mode():
        while len(new) < max_new and (not new or new[-1] != tokenizer.eos_token_id):
            full = torch.cat([ids, torch.tensor([new], dtype=torch.long, device=ids.device)], dim=1)
            new.append(int(model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, -1].argmax()))
    return new


def peft_lora(directory, weight=1.0):
    def setup(model):
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(directory))
        if weight != 1.0:
            for module in peft_model.modules():
                if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                    module.scaling["default"] *= weight
        return peft_model
    return setup


def bottleneck_after(directory, setup_first=lambda m: m, weight=1.0):
    """The saved bottleneck tensors applied by plain hooks after each module (LoRA first, if any)."""
    from safetensors.torch import load_file

    def setup(model):
        model = setup_first(model)
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        act = getattr(torch.nn.functional, json.loads((directory / "adapter_config.json").read_text())["activation"])
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for key in [k for k in tensors if k.endswith(".bottleneck.down.weight")]:
            name = key[: -len(".bottleneck.down.weight")]
            p = {s: tensors[f"{name}.bottleneck.{s}"] for s in ("down.weight", "down.bias", "up.weight", "up.bias")}
            module = base.get_submodule(name)

            def hook(_m, _a, out, p=p):
                q = {k: v.to(out.device, torch.float32) for k, v in p.items()}  # in float32, as the server
                h = out.float()
                up = act(h @ q["down.weight"].T + q["down.bias"]) @ q["up.weight"].T + q["up.bias"]
                return out + (weight * up).to(out.dtype)
            module.register_forward_hook(hook)
        return model
    return setup


def method_load(name, directory):
    def setup(model):
        from adapterhub.manager import PluginManager

        return PluginManager(autoload=False).get_method(name).load(model, directory)
    return setup


def bias_after(directory, setup_first=lambda m: m, weight=1.0):
    """The saved BitFit changes added after each module by plain hooks (any base, nf4 included)."""
    from safetensors.torch import load_file

    def setup(model):
        model = setup_first(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for key, change in load_file(str(directory / "adapter_model.safetensors")).items():
            def hook(_m, _a, out, change=change):
                return out + (weight * change.to(out.device, torch.float32)).to(out.dtype)
            base.get_submodule(key.removesuffix(".bias")).register_forward_hook(hook)
        return model
    return setup
