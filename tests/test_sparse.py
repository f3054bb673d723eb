"""The sparse method (PEFT SHiRA) beyond the contract matrix: its mask config, its PEFT files, and its
mixed-batch serving through the real engine against the method's own forward."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from mixed_world import MAX_NEW, chat, method_load, offline_tokens, peft_lora

from adapterhub import ConfigError
from adapterhub.manager import PluginManager

PROMPTS = ["the good day", "a bad movie", "dark cold room"]


def sparse():
    return PluginManager(autoload=False).get_method("sparse")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    """A registry with two sparse adapters (random mask r=8, magnitude mask r=4: stacks of two sizes)
    and a LoRA, each trained a few steps on the tiny base."""
    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.data import load_dataset
    from adapterhub.registry import open_registry
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions

    root = tmp_path_factory.mktemp("sparse")
    store = open_registry(root / "registry")
    dirs = {}
    for task, name, values, data_task, lr in [("rand", "sparse", {}, "sentiment", 3e-2),
                                              ("mag", "sparse", {"r": 4, "mask_type": "magnitude"}, "reverse", 3e-2),
                                              ("lo", "lora", {}, "reverse", 1e-2)]:
        method = PluginManager(autoload=False).get_method(name)
        config = method.make_config(values)
        train, _ = write_split(data_task, root / f"data-{task}", n_train=32, n_test=2)
        options = TrainOptions(max_steps=10, lr=lr, batch_size=8, progress=False, seed=0, run_dir=str(root / f"run-{task}"))
        result = method.train(load_base(tiny_base_dir, "none").model, load_dataset(train, tiny_tokenizer, max_length=64),
                              config, options, tokenizer=tiny_tokenizer)
        dirs[task] = save_adapter(method, result.model, config, root / f"adapter-{task}",
                                  base={"name": "tiny", "fingerprint": fingerprint(tiny_base_dir)})
        store.publish(task, dirs[task])
    return {"registry": root / "registry", "dirs": dirs}


def sparse_after(directory, setup_first=lambda m: m, weight=1.0):
    """The saved sparse change added after each module by plain hooks: ``w * x @ S.T``."""
    def setup(model):
        model = setup_first(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        for key in [k for k in tensors if k.endswith(".shira_weight")]:
            name = key.removesuffix(".shira_weight")
            module = base.get_submodule(name.removeprefix("base_model.model."))
            dense = torch.zeros(module.out_features, module.in_features)
            dense[tuple(tensors[f"{name}.shira_indices"].long())] = tensors[key]

            def hook(_m, args, out, dense=dense):
                return out + (weight * args[0].float() @ dense.T).to(out.dtype)
            module.register_forward_hook(hook)
        return model
    return setup


def serve_concurrently(tiny_base_dir, registry, quantize, combos) -> dict:
    from adapterhub.serve.client import Client
    from adapterhub.serve.server import AdapterServer, ServerOptions

    jobs = [(name, text) for name in combos for text in PROMPTS]
    barrier = threading.Barrier(len(jobs))
    server = AdapterServer(ServerOptions(base=str(tiny_base_dir), registry=str(registry), port=0, quantize=quantize,
                                         max_adapters=4, max_new_tokens=64)).start()
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client, ThreadPoolExecutor(len(jobs)) as pool:
            def call(job):
                barrier.wait()
                return list(client.generate(messages=chat(job[1]), adapters=combos[job[0]][0],
                                            max_new_tokens=MAX_NEW).token_ids)
            served = dict(zip(jobs, pool.map(call, jobs)))
        assert server.engine.largest_batch > 1, "requests were not batched together"
        if any(ref.startswith(("rand", "mag")) for refs, _ in combos.values() for ref, _ in refs):
            assert server.engine.pool.sparse.writes, "the sparse adapters took the exclusive path"
    finally:
        server.stop(grace=1)
    return served


def test_served_rows_equal_the_methods_own_forward(adapters, tiny_base_dir, tiny_tokenizer):
    """Full precision, one batch: each sparse adapter alone equals PEFT SHiRA's own forward (the method's
    ``load``), beside base rows, LoRA rows, a weighted sparse row and a sparse + LoRA composition."""
    d = adapters["dirs"]
    combos = {
        "base": ([], lambda m: m),
        "rand": ([("rand@1", 1.0)], method_load("sparse", d["rand"])),
        "mag": ([("mag@1", 1.0)], method_load("sparse", d["mag"])),
        "lora": ([("lo@1", 1.0)], peft_lora(d["lo"])),
        "rand*0.5": ([("rand@1", 0.5)], sparse_after(d["rand"], weight=0.5)),
        "rand+lora": ([("rand@1", 1.0), ("lo@1", 0.5)], sparse_after(d["rand"], peft_lora(d["lo"], 0.5))),
    }
    served = serve_concurrently(tiny_base_dir, adapters["registry"], "none", combos)
    for (name, text), tokens in served.items():
        expected = offline_tokens(tiny_base_dir, tiny_tokenizer, chat(text), combos[name][1], quantize="none")
        assert tokens == expected, f"{name} / {text!r} differs from offline"
    by_name = {name: [served[name, t] for t in PROMPTS] for name in combos}
    assert by_name["rand"] != by_name["base"] and by_name["mag"] != by_name["base"], "an adapter that changes nothing"


def test_served_on_nf4_equals_the_methods_own_forward(adapters, tiny_base_dir, tiny_tokenizer):
    """The server's default nf4 base: PEFT adds x @ S.T beside the 4-bit layer, so does the server."""
    d = adapters["dirs"]
    combos = {"rand": ([("rand@1", 1.0)], method_load("sparse", d["rand"])), "base": ([], lambda m: m)}
    served = serve_concurrently(tiny_base_dir, adapters["registry"], "nf4", combos)
    for (name, text), tokens in served.items():
        assert tokens == offline_tokens(tiny_base_dir, tiny_tokenizer, chat(text), combos[name][1]), (name, text)


def test_saved_as_peft_shira_and_the_magnitude_mask_holds_the_largest_weights(adapters, tiny_model):
    directory = adapters["dirs"]["mag"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["mask_type"]) == ("SHIRA", 4, "magnitude")
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.down_proj"
    weight = tiny_model.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    rows, cols = tensors[f"{key}.shira_indices"].long()
    assert len(rows) == 4 * sum(weight.shape) == tensors[f"{key}.shira_weight"].numel()
    chosen = weight.abs()[rows, cols]
    assert chosen.min() >= weight.abs().flatten().topk(len(rows)).values.min()


def test_mask_config_errors_name_the_value_and_the_fix(tiny_base_dir):
    from adapterhub.base import load_base

    method = sparse()
    with pytest.raises(ConfigError, match=r"r=0 must be between 1 and 4096.*--set r=8"):
        method.make_config({"r": 0})
    with pytest.raises(ConfigError, match=r"mask_type='top' is not one of \['random', 'magnitude'\]"):
        method.make_config({"mask_type": "top"})
    with pytest.raises(ConfigError, match="mask_seed=-1"):
        method.make_config({"mask_seed": -1})
    # k_proj of the tiny base is [64, 128]: at most 64 * 128 / 192 = 42 entries per unit of r
    with pytest.raises(ConfigError, match=r"r=60 asks 11520 entries of model\.layers\.0\.self_attn\.k_proj \[64, 128\].*"
                                          r"--set r=42 or less"):
        method.attach(load_base(tiny_base_dir, "none").model, method.make_config({"r": 60}))
    with pytest.raises(ConfigError, match="matches no Linear"):
        method.attach(load_base(tiny_base_dir, "none").model, method.make_config({"target_modules": "nope_proj"}))
    with pytest.raises(ConfigError, match="mask_type=magnitude reads the base weights"):
        method.attach(load_base(tiny_base_dir, "nf4").model, method.make_config({"mask_type": "magnitude"}))


def test_the_same_seed_gives_the_same_mask_and_another_seed_another(tiny_base_dir):
    from adapterhub.base import load_base

    def indices(seed):
        model = sparse().attach(load_base(tiny_base_dir, "none").model, sparse().make_config({"mask_seed": seed}))
        layer = model.get_submodule("base_model.model.model.layers.1.self_attn.q_proj")
        return layer.shira_indices["default"].clone()

    assert torch.equal(indices(3), indices(3))
    assert not torch.equal(indices(3), indices(4))


def test_not_composed_with_dora():
    from types import SimpleNamespace

    from adapterhub.errors import LimitExceeded
    from adapterhub.serve.kinds import KINDS, Served, check_composition

    kinds = {k.name: k for k in KINDS}
    entry = lambda name, kind: SimpleNamespace(key=f"{name}@1", method=None, served=Served(kind))  # noqa: E731
    with pytest.raises(LimitExceeded, match="DoRA"):
        check_composition([(entry("s", kinds["sparse"]), 1.0), (entry("d", kinds["dora"]), 1.0)])
    check_composition([(entry("s", kinds["sparse"]), 0.5), (entry("l", kinds["lora"]), 1.0)])
