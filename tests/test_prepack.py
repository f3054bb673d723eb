"""Prepacked base weights (``serve/prepack.py``): the function ``F.linear`` computes, fused siblings
included, out of autograd's way, fresh after a pause that wrote the weights, and plain again once
removed; the engine's exclusive path, which writes base weights, answers as the method's own
``load`` does. Fused RMSNorm (``serve/fused_norm.py``): switched only where ``F.rms_norm`` gives the
module's own bits, and plain again once removed."""

from __future__ import annotations

import pytest
import torch

from adapterhub.serve import fused_norm, prepack

from mixed_world import chat, method_load, offline_tokens

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


IDS = torch.tensor([[5, 17, 42, 99, 3], [8, 8, 1, 250, 77]])


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_packed_forward_is_f_linear_and_removal_restores_it(tiny_model):
    plain = _logits(tiny_model, IDS)
    packed = prepack.PackedLinears(tiny_model).install()
    assert packed.modules and all("forward" in m.__dict__ for m in packed.modules)
    assert torch.allclose(_logits(tiny_model, IDS), plain, atol=1e-5, rtol=1e-5)
    packed.remove()
    assert not any("forward" in m.__dict__ for m in packed.modules)
    assert torch.equal(_logits(tiny_model, IDS), plain)


def test_siblings_share_one_packed_gemm_and_each_gets_its_own_columns(tiny_model):
    layer = tiny_model.model.layers[0]
    packed = prepack.PackedLinears(tiny_model).install()
    names = {tuple(n for n, c in layer.named_modules() for m in g if c is m) for g in packed.groups[:2]}
    assert names == {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")}
    assert len(packed.groups) == 2 * len(tiny_model.model.layers)
    x = torch.randn(2, 3, layer.self_attn.q_proj.in_features)
    with torch.inference_mode():
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert torch.allclose(m(x), torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-5, rtol=1e-5)
        k_first = layer.self_attn.k_proj(x)  # any member may come first; a repeat starts a new GEMM
        assert torch.allclose(layer.self_attn.k_proj(x), k_first) and torch.allclose(
            layer.self_attn.q_proj(x), torch.nn.functional.linear(x, layer.self_attn.q_proj.weight), atol=1e-5)


def test_a_member_whose_pre_hook_changes_its_input_computes_on_that_input(tiny_model):
    """IA3 scales a feed-forward module's input in a pre-hook: that member's own input, not the group's."""
    mlp = tiny_model.model.layers[0].mlp
    prepack.PackedLinears(tiny_model).install()
    handle = mlp.up_proj.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    x = torch.randn(2, 3, mlp.gate_proj.in_features)
    try:
        with torch.inference_mode():
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    finally:
        handle.remove()
    assert torch.allclose(gate, torch.nn.functional.linear(x, mlp.gate_proj.weight), atol=1e-5, rtol=1e-5)
    assert torch.allclose(up, torch.nn.functional.linear(2 * x, mlp.up_proj.weight), atol=1e-5, rtol=1e-5)


def test_a_pause_that_writes_weights_repacks_them(tiny_model):
    layer = tiny_model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    packed = prepack.PackedLinears(tiny_model).install()
    with torch.inference_mode():
        before = layer(x)
    with packed.paused():
        assert "forward" not in layer.__dict__  # plain F.linear while weights may change
        with torch.no_grad():
            layer.weight.add_(0.5)
    with torch.inference_mode():
        after = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert "forward" in layer.__dict__
    assert torch.allclose(after, expected, atol=1e-5) and not torch.allclose(after, before, atol=1e-2)


def test_training_through_a_packed_layer_gets_the_weights_gradient(tiny_model):
    layer = tiny_model.model.layers[0].mlp.down_proj
    x = torch.randn(2, layer.in_features)
    layer(x).sum().backward()
    plain = layer.weight.grad.clone()
    layer.weight.grad = None
    prepack.PackedLinears(tiny_model).install()
    layer(x).sum().backward()
    assert layer.weight.grad is not None and torch.allclose(layer.weight.grad, plain)


def test_only_plain_float_linears_are_packed():
    class Quantized(torch.nn.Linear):  # bitsandbytes' layers subclass nn.Linear with a forward of their own
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Quantized(8, 8), torch.nn.Linear(8, 8).to(torch.float16))
    assert [type(m) for m in prepack.PackedLinears(model).modules] == [torch.nn.Linear]
    assert "no float Linear" in prepack.supported(torch.nn.Sequential(Quantized(8, 8)))


def test_the_models_norms_are_fused_and_its_logits_keep_every_bit(tiny_model):
    plain = _logits(tiny_model, IDS)
    norms = fused_norm.FusedNorms(tiny_model).install()
    assert len(norms.modules) == 2 * len(tiny_model.model.layers) + 1  # two a layer, and the final one
    assert torch.equal(_logits(tiny_model, IDS), plain)
    norms.remove()
    assert not any("forward" in m.__dict__ for m in norms.modules)


def test_a_deep_copy_of_a_fused_norm_computes_with_its_own_weight(tiny_model):
    """PEFT's ``modules_to_save`` deep-copies a module and trains the copy."""
    import copy

    norm = tiny_model.model.norm
    fused_norm.FusedNorms(tiny_model).install()
    twin = copy.deepcopy(norm)
    with torch.no_grad():
        twin.weight.mul_(3)
    x = torch.randn(2, 3, norm.weight.shape[0])
    with torch.inference_mode():
        assert torch.equal(twin(x), type(twin).forward(twin, x))
        assert not torch.allclose(twin(x), norm(x))


def test_a_norm_that_computes_something_else_keeps_its_forward():
    class GemmaLikeRMSNorm(torch.nn.Module):  # Gemma scales by (1 + weight)
        def __init__(self, dim):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(dim))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = torch.nn.Sequential(GemmaLikeRMSNorm(16))
    assert fused_norm.FusedNorms(model).modules == []


def test_half_precision_and_autograd_take_the_modules_own_forward(tiny_model):
    norm = tiny_model.model.norm
    fused_norm.FusedNorms(tiny_model).install()
    x = torch.randn(2, 3, norm.weight.shape[0], requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    half = torch.randn(2, 3, norm.weight.shape[0]).to(torch.bfloat16)
    own = type(norm).forward(norm, half)
    assert norm(half).dtype == own.dtype and torch.equal(norm(half), own)


@pytest.fixture(scope="module")
def freeze_registry(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    """A ``freeze`` adapter (whole weight matrices: the exclusive path, which writes the base's weights)."""
    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.data import load_dataset
    from adapterhub.manager import PluginManager
    from adapterhub.registry import open_registry
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions

    root = tmp_path_factory.mktemp("prepack")
    train, _ = write_split("reverse", root / "data", n_train=32, n_test=2)
    method = PluginManager(autoload=False).get_method("freeze")
    config = method.make_config({"top_k_layers": 1})
    options = TrainOptions(max_steps=6, lr=3e-2, batch_size=8, progress=False, seed=0, run_dir=str(root / "run"))
    result = method.train(load_base(tiny_base_dir, "none").model, load_dataset(train, tiny_tokenizer, max_length=64),
                          config, options, tokenizer=tiny_tokenizer)
    out = save_adapter(method, result.model, config, root / "adapter",
                       base={"name": "tiny", "fingerprint": fingerprint(tiny_base_dir)})
    open_registry(root / "registry").publish("top", out)
    return root / "registry", out


def test_the_exclusive_path_on_a_packed_base_answers_as_the_methods_own_load(freeze_registry, tiny_base_dir,
                                                                               tiny_tokenizer):
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.requests import GenerationRequest

    registry, directory = freeze_registry
    base = load_base(tiny_base_dir, "none")
    engine = Engine.create(base, AdapterSource(registry), capacity=2)
    messages = chat("the good day")
    try:
        assert engine.packed is not None
        ask = lambda adapters: engine.submit(GenerationRequest.build(messages=messages, adapters=adapters,
                                                                     max_new_tokens=8)).result().token_ids
        served, after = ask([("top@1", 1.0)]), ask([])
    finally:
        engine.stop(1)
    assert served == offline_tokens(tiny_base_dir, tiny_tokenizer, messages, method_load("freeze", directory),
                                    quantize="none")
    base_tokens = offline_tokens(tiny_base_dir, tiny_tokenizer, messages, lambda m: m, quantize="none")
    assert served != base_tokens, "an adapter that changes nothing proves nothing"
    assert after == base_tokens, "the exclusive path left the packed base changed"
    assert not any("forward" in m.__dict__ for m in engine.packed.modules + engine.norms.modules), \
        "a stopped engine leaves the base plain"


def test_weight_prepack_off_leaves_the_base_plain(tiny_base_dir, freeze_registry):
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    base = load_base(tiny_base_dir, "none")
    engine = Engine.create(base, AdapterSource(freeze_registry[0]), capacity=2, weight_prepack=False)
    try:
        assert engine.packed is None
        assert not any("forward" in m.__dict__ for m in base.model.modules() if isinstance(m, torch.nn.Linear))
    finally:
        engine.stop(1)
