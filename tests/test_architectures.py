"""Any decoder, not only Llama: train -> publish -> serve on small random configs of each architecture.

Each case writes a tiny random base of one architecture (every weight row a multiple of 64, so
bitsandbytes nf4 works on the CPU), trains its methods for a few steps through the CLI's own path
(``train_and_publish``: load, train, save, publish to a registry in a temp dir), serves them all
at once from a real server on 127.0.0.1 (nf4, or full precision where the case says so), and checks
every served greedy answer against offline generation with the method's own ``load`` on a fresh
base, token for token. GPT-2 covers ``Conv1D`` layers (LoRA's ``fan_in_fan_out``), ``transformer.h.N``,
tied embeddings and a config with neither ``intermediate_size`` nor ``num_key_value_heads``; GPT-NeoX
fused ``query_key_value`` and no ``num_key_value_heads``; Phi-3 fused ``qkv_proj``/``gate_up_proj``,
which PEFT's target tables do not know; Qwen3 a ``head_dim`` that is not ``hidden / heads``.

The cheaper tests below check what the matrix relies on: decoder layers, block layouts and
default targets read from the module tree (meta device), and ``check_quantizable`` naming the layer.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from adapterhub.errors import BaseModelError

MAX_NEW = 8
PROMPT = "the good day"
STEPS = 3
# else 3e-2: a few steps must change the greedy answer, or served == offline would prove nothing
LR = {"ia3": 0.3, "adalora": 0.3, "prefix": 0.3}  # prefix starts as the base's own keys/values


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on these tiny models every op is a few microseconds of work, and with two
    threads on busy cores each op waits for both to be scheduled (measured: 20x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _messages(text):
    return [("user", f"sentiment?\n\n{text}")]


def _config(arch: str, tokenizer, **sizes):
    """A small random config of ``arch`` (hidden 128, 2 layers, MLP 256 unless ``sizes`` says)."""
    import transformers as T

    ids = dict(vocab_size=320, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)
    common.update(sizes)
    gqa = dict(common, num_key_value_heads=2)
    make = {
        "llama": lambda: T.LlamaConfig(**gqa, **ids),
        "qwen2": lambda: T.Qwen2Config(**gqa, **ids),  # biases on q/k/v
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=64, **ids),  # heads * head_dim != hidden
        "mistral": lambda: T.MistralConfig(**gqa, sliding_window=256, **ids),
        "gpt2": lambda: T.GPT2Config(n_embd=common["hidden_size"], n_layer=2, n_head=4, n_positions=512,
                                     n_inner=sizes.get("intermediate_size"), **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common, rotary_pct=0.25, **ids),
        "phi": lambda: T.PhiConfig(**common, partial_rotary_factor=0.5, **ids),
        "phi3": lambda: T.Phi3Config(**gqa, **ids),
    }
    return make[arch]()


def write_base(arch: str, out: Path) -> Path:
    """A random ``arch`` base directory, the way a Hub checkpoint looks (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    from adapterhub.presets import build_tokenizer

    tokenizer = build_tokenizer(512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, tokenizer))
    with torch.no_grad():  # larger than the default init, so that a few steps change greedy answers
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# arch, methods trained and served, quantizations served (and used offline). GPT-2 is served in full
# precision too: there LoRA and IA3 hook Conv1D itself (fan_in_fan_out), not a 4-bit Linear; it also
# runs the LoRA relatives (AdaLoRA's SVD form, DoRA on the server's per-adapter path).
OURS = ("lora", "adapter", "prefix", "ia3")
CASES = [
    ("llama", OURS, ("nf4",)),
    ("qwen2", OURS, ("nf4",)),
    ("qwen3", OURS, ("nf4",)),
    ("mistral", OURS, ("nf4",)),
    ("gpt2", OURS + ("qlora", "loraplus", "adalora", "dora"), ("nf4", "none")),
    ("gpt_neox", OURS + ("qlora",), ("nf4",)),
    ("phi", OURS, ("nf4",)),
    ("phi3", OURS + ("qlora",), ("nf4",)),
]


def offline_tokens(base_dir: Path, quantize: str, tokenizer, method_name: str | None, directory: Path | None,
                   text: str = PROMPT) -> list[int]:
    """Greedy answer of one request alone: a fresh base, the method's own ``load``, repeated full
    forward passes (no ``generate``: PEFT's prompt-learning generate differs from its forward)."""
    from adapterhub.base import load_base
    from adapterhub.data import render_prompt
    from adapterhub.generation import greedy_tokens
    from adapterhub.manager import PluginManager

    model = load_base(base_dir, quantize).model
    if method_name is not None:
        model = PluginManager(autoload=False).get_method(method_name).load(model, directory)
    model.eval()
    prompt = render_prompt(tokenizer, [{"role": r, "content": c} for r, c in _messages(text)])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return greedy_tokens(model, tokenizer, [ids], max_new_tokens=MAX_NEW)[0]


def tie_gap(base_dir: Path, quantize: str, tokenizer, method_name: str | None, directory: Path | None,
            expected: list[int], served: list[int]) -> float:
    """At the first token where ``served`` leaves ``expected``: the offline model's logit of its own
    choice minus that of the served one, relative to the logits' scale (a near-tie is ~1e-6: float
    sums in another order, e.g. DoRA's scale applied to base + delta at once, as in PEFT's algebra)."""
    import torch

    from adapterhub.base import load_base
    from adapterhub.data import render_prompt
    from adapterhub.manager import PluginManager

    i = next(k for k, (a, b) in enumerate(zip(expected, served)) if a != b)
    model = load_base(base_dir, quantize).model
    if method_name is not None:
        model = PluginManager(autoload=False).get_method(method_name).load(model, directory)
    model.eval()
    prompt = render_prompt(tokenizer, [{"role": r, "content": c} for r, c in _messages(PROMPT)])
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] + expected[:i]])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
    return float((logits[expected[i]] - logits[served[i]]) / logits.abs().max())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from adapterhub.tasks import write_split

    train, _ = write_split("sentiment", tmp_path_factory.mktemp("arch-data"), n_train=16, n_test=2)
    return train


@pytest.mark.parametrize("arch, methods, quantizations", CASES, ids=[a for a, _, _ in CASES])
def test_train_publish_serve(arch, methods, quantizations, data, tmp_path, plugin_manager):
    from adapterhub.base import load_tokenizer
    from adapterhub.pipeline import train_and_publish
    from adapterhub.training import TrainOptions

    base_dir = write_base(arch, tmp_path / "base")
    registry = tmp_path / "registry"
    trained = {}
    for name in methods:
        method = plugin_manager.get_method(name)
        options = TrainOptions(max_steps=STEPS, lr=LR.get(name, 3e-2), batch_size=4, max_length=64, progress=False,
                               seed=0, run_dir=str(tmp_path / f"run-{name}"))
        top = {"base": str(base_dir), "data": str(data), "task": f"{arch}-{name}", "registry": str(registry),
               "output": str(tmp_path / f"adapter-{name}")}  # quantize: the method's default (qlora: nf4)
        outcome = train_and_publish(method, method.make_config({}), options, top)
        assert outcome.reference == f"{arch}-{name}@1"
        trained[name] = outcome.directory

    tokenizer = load_tokenizer(base_dir)
    for quantize in quantizations:
        served = serve_all(base_dir, registry, quantize, [None, *methods], lambda name: f"{arch}-{name}@1")
        for name, tokens in served.items():
            expected = offline_tokens(base_dir, quantize, tokenizer, name, trained.get(name))
            if tokens != expected:  # allowed only where the offline model itself has a near-tie
                gap = tie_gap(base_dir, quantize, tokenizer, name, trained.get(name), expected, tokens)
                assert gap < 1e-4, f"{arch} ({quantize}) {name or 'base'}: served {tokens}, offline {expected} (gap {gap:.2e})"
        for name in methods:  # else a server that ignored the adapter would pass
            assert served[name] != served[None], f"{arch} ({quantize}): {name} did not change the answer"


def serve_all(base_dir: Path, registry: Path, quantize: str, methods: list[str | None], ref) -> dict:
    """Greedy answers of one server to one request per method (None: the base), sent at once so
    that rows with different adapters share forward passes."""
    from adapterhub.serve.client import Client

    from serve_helpers import running_server

    with running_server(base_dir, registry, quantize=quantize, max_adapters=len(methods)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        for name in filter(None, methods):  # loaded first, so that the requests arrive together
            client.load(ref(name))
        barrier = threading.Barrier(len(methods))

        def call(name):
            barrier.wait()
            adapters = [(ref(name), 1.0)] if name else []
            answer = client.generate(messages=_messages(PROMPT), adapters=adapters, max_new_tokens=MAX_NEW)
            return list(answer.token_ids)

        with ThreadPoolExecutor(len(methods)) as pool:
            served = dict(zip(methods, pool.map(call, methods)))
        assert server.engine.largest_batch > 1, "requests for different adapters were not batched together"
    return served


# -- what the matrix relies on, read from the module tree -------------------------------------------

# arch -> (decoder layer 0, attention output, MLP output, IA3 targets, IA3 feed-forward modules)
EXPECTED = {
    "llama": ("model.layers.0", "self_attn.o_proj", "mlp.down_proj", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": ("model.layers.0", "self_attn.o_proj", "mlp.down_proj", ["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": ("transformer.h.0", "attn.c_proj", "mlp.c_proj", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": ("gpt_neox.layers.0", "attention.dense", "mlp.dense_4h_to_h", ["query_key_value", "dense_4h_to_h"],
                 ["dense_4h_to_h"]),
    "phi": ("model.layers.0", "self_attn.dense", "mlp.fc2", ["q_proj", "v_proj", "fc2"], ["fc2"]),
    # not in PEFT's IA3 tables: the attention's input projection and the MLP output, from the tree
    "phi3": ("model.layers.0", "self_attn.o_proj", "mlp.down_proj", ["self_attn.qkv_proj", "mlp.down_proj"],
             ["mlp.down_proj"]),
}


@pytest.fixture(scope="module")
def byte_tokenizer():
    from adapterhub.presets import build_tokenizer

    return build_tokenizer(512)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_layout_and_default_targets_come_from_the_module_tree(arch, byte_tokenizer):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    from adapterhub.architectures import block_layout, decoder_layers, ia3_defaults, layer_index_of, meta_model

    model = meta_model(_config(arch, byte_tokenizer))
    first, attention, mlp, ia3_targets, ia3_feedforward = EXPECTED[arch]
    layers = decoder_layers(model)
    assert [name for name, _ in layers] == [first, first[:-1] + "1"]
    layout = block_layout(model)
    assert (layout.attention_output, layout.mlp_output) == (attention, mlp)
    assert ia3_defaults(model) == (ia3_targets, ia3_feedforward)
    if arch in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:  # PEFT's own table wins where it has one
        assert ia3_targets == list(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[arch])
    index = layer_index_of(model)
    assert index(f"{first[:-1]}1.{mlp}.weight") == 1 and index(f"{first}.{attention}.weight") == 0
    assert index(next(n for n, _ in model.named_parameters())) is None  # the embeddings sit outside the layers


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_own_methods_find_layers_off_llama(arch, tmp_path, plugin_manager):
    """bitfit, freeze, full and the bottleneck adapter on bases without ``.layers.``/``nn.Linear``
    names; each saves what it trained and loads back to the same logits."""
    from adapterhub.architectures import decoder_layers, linear_layers
    from adapterhub.base import load_base

    base_dir = write_base(arch, tmp_path / "base")
    base = load_base(base_dir).model
    layers = [name for name, _ in decoder_layers(base)]
    linears = [n for n, _, _ in linear_layers(base) if n.startswith(tuple(f"{x}." for x in layers))]
    ids = torch.tensor([[257, 70, 71, 72, 73]])
    expected_trainable = {
        "bitfit": lambda n: n.endswith(".bitfit.bias") and n.rsplit(".bitfit.", 1)[0] in linears,
        "freeze": lambda n: n.startswith(layers[-1] + "."),
        "adapter": lambda n: ".bottleneck." in n,
    }
    for name, trains in expected_trainable.items():
        method = plugin_manager.get_method(name)
        config = method.make_config({"top_k_layers": 1} if name == "freeze" else {})
        model = method.attach(load_base(base_dir).model, config)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(trains(n) for n in trainable), f"{name} trains {trainable[:4]}"
        if name == "bitfit":
            assert len(trainable) == len(linears)
        if name == "adapter":
            assert len(trainable) == 4 * 2 * len(layers)  # down/up weight and bias after attention and MLP
        with torch.no_grad():  # a change to save, then it must come back through load
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
            changed = model(ids).logits
        method.save(model, tmp_path / name)
        if name == "adapter":  # the file names the modules "auto" found, so it says where it sits
            saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
            layout = EXPECTED[arch]
            assert (saved["attn_output_module"], saved["mlp_output_module"]) == (layout[1], layout[2])
        loaded = method.load(load_base(base_dir).model, tmp_path / name)
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, changed, atol=1e-5), f"{name} on {arch} does not load back"
    full = plugin_manager.get_method("full")
    model = full.attach(load_base(base_dir).model, full.make_config({"train_embeddings": False}))
    frozen = {id(p) for p in model.get_input_embeddings().parameters()}
    assert all(p.requires_grad == (id(p) not in frozen) for p in model.parameters())


# -- check_quantizable --------------------------------------------------------------------------


@pytest.mark.parametrize("arch, sizes, layer, width", [
    ("gpt2", {"hidden_size": 96}, "transformer.h.0.attn.c_attn", 96),  # Conv1D: rows are its first dim
    ("gpt2", {"intermediate_size": 160}, "transformer.h.0.mlp.c_proj", 160),  # n_inner, no intermediate_size
    ("gpt_neox", {"intermediate_size": 160}, "gpt_neox.layers.0.mlp.dense_4h_to_h", 160),
    ("phi", {"intermediate_size": 160}, "model.layers.0.mlp.fc2", 160),
    ("llama", {"intermediate_size": 160}, "model.layers.0.mlp.down_proj", 160),
])
def test_check_quantizable_names_the_layer(arch, sizes, layer, width, byte_tokenizer):
    from adapterhub.architectures import check_quantizable

    config = _config(arch, byte_tokenizer, **sizes)
    with pytest.raises(BaseModelError, match=rf"layer {layer} has rows of {width} values"):
        check_quantizable(config)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi", "phi3", "qwen3"])
def test_check_quantizable_passes_configs_without_llama_fields(arch, byte_tokenizer):
    from adapterhub.architectures import check_quantizable

    config = _config(arch, byte_tokenizer)
    if arch == "gpt2":
        assert not hasattr(config, "intermediate_size") and not hasattr(config, "num_key_value_heads")
    check_quantizable(config)


def test_nf4_load_of_an_unquantizable_gpt2_names_the_layer(tmp_path, byte_tokenizer):
    """The crash users saw (``serve`` on nf4): now a clear error from the real loading path."""
    from transformers import AutoModelForCausalLM

    from adapterhub.base import load_base

    AutoModelForCausalLM.from_config(_config("gpt2", byte_tokenizer, hidden_size=96)).save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(BaseModelError, match=r"transformer\.h\.0\.attn\.c_attn.*--quantize none"):
        load_base(tmp_path, "nf4")
