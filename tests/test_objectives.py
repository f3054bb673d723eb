"""The objective axis: registration, data shapes, dpo and kto on the tiny base, lineage, serving.

Every training run here is real (TRL's trainers, a few steps on the tiny random base) and publishes
to a registry in a temp dir; the adapters are then served by a real server on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from objective_helpers import write

import adapterhub
from adapterhub.cli import main
from adapterhub.errors import ConfigError, PluginError
from adapterhub.manager import PluginManager

SENTIMENT_WORDS = {"positive": ("good", "great", "happy", "love"), "negative": ("bad", "sad", "awful", "poor")}


def preference_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        other = "negative" if label == "positive" else "positive"
        word = SENTIMENT_WORDS[label][(i // 2) % 4]
        rows.append({"instruction": "sentiment?", "input": f"the {word} day {i}", "chosen": label, "rejected": other})
    return rows


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", preference_rows(32))


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> Path:
    rows = [{"prompt": r["instruction"] + " " + r["input"], "completion": r["chosen"] if i % 2 else r["rejected"],
             "label": bool(i % 2)} for i, r in enumerate(preference_rows(32))]
    return write(tmp_path_factory.mktemp("kto") / "kto.jsonl", rows)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


def train(capsys, base: Path, registry: Path, *args: str) -> str:
    code = main(["train", "--base", str(base), "--registry", str(registry), "--no-progress", "--seed", "0", *args])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    return out[-1]


def manifest(registry: Path, ref: str) -> dict:
    from adapterhub.registry import open_registry

    m = open_registry(str(registry)).manifest(ref)
    return {"training": m.training, "metrics": m.metrics, "parent": m.parent, "method": m.method}


# -- the axis ----------------------------------------------------------------------------------


def test_objectives_lists_both_built_in_axes_with_shapes_and_keys(capsys):
    assert main(["objectives", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"sft", "dpo", "kto", "reward", "grpo", "distill"} <= set(rows)
    assert all(r["origin"] == "built-in" for r in rows.values())
    assert '"chosen", "rejected"' in rows["dpo"]["data_shape"]
    assert {f["name"] for f in rows["dpo"]["config"]} == {"beta", "loss_type", "label_smoothing"}
    assert main(["objectives", "--objective", "kto"]) == 0
    assert "desirable_weight (float, default 1.0)" in capsys.readouterr().out


class EchoSft(adapterhub.Objective):
    """A third-party objective: SFT under another name, registered through the hook."""

    name = "echo-sft"
    description = "SFT, from a plugin"
    data_shape = "as sft"

    def read_data(self, path):
        from adapterhub.data import read_examples

        return read_examples(path)

    def train(self, job):
        from adapterhub.objectives.sft import Sft

        return Sft().train(job)


class ObjectivePlugin:
    @adapterhub.hookimpl
    def adapterhub_register_objectives(self, register):
        register(EchoSft())


class Duplicate:
    @adapterhub.hookimpl
    def adapterhub_register_objectives(self, register):
        class Dpo(EchoSft):
            name = "dpo"

        register(Dpo())


def test_a_plugin_objective_registers_and_trains_and_a_taken_name_is_reported(plugin_manager, capsys, tiny_base_dir,
                                                                             sentiment_data, registry):
    plugin_manager.register(ObjectivePlugin(), name="objective-plugin", origin="adapterhub-objective-example")
    plugin_manager.register(Duplicate(), name="dup-objective")
    try:
        objectives = plugin_manager.objectives()
        assert objectives["echo-sft"].origin == "adapterhub-objective-example"
        assert objectives["dpo"].origin == "built-in"
        assert any("objective name 'dpo' is already provided" in b.error for b in plugin_manager.broken)
        ref = train(capsys, tiny_base_dir, registry, "--plugin", "lora", "--objective", "echo-sft",
                    "--data", str(sentiment_data[0]), "--task", "echo", "--max-steps", "2")
        assert manifest(registry, ref)["training"]["objective"] == {"name": "echo-sft", "config": {}}
    finally:
        plugin_manager.unregister("objective-plugin")
        plugin_manager.unregister("dup-objective")


def test_unknown_objective_and_config_key_name_the_fix(tiny_base_dir, prefs):
    with pytest.raises(PluginError, match="unknown objective 'dpp'; available: .*dpo"):
        PluginManager(autoload=False).get_objective("dpp")
    dpo = PluginManager(autoload=False).get_objective("dpo")
    with pytest.raises(ConfigError, match=r"no key 'bta'.*adapterhub objectives --objective dpo"):
        dpo.make_config({"bta": "0.1"})
    with pytest.raises(ConfigError, match="beta=0.0 must be > 0"):
        dpo.make_config({"beta": "0"})
    with pytest.raises(ConfigError, match="loss_type='nope' is not one of"):
        dpo.make_config({"loss_type": "nope"})


# -- recommended training options: the user's > the objective's > the method's -----------------

LEARNING_OPTIONS = {"lr", "epochs", "warmup_steps", "scheduler", "weight_decay", "max_grad_norm"}


@pytest.mark.parametrize("name", sorted(PluginManager(autoload=False).objectives()))
def test_an_objectives_recommendations_are_learning_options_only(name):
    from adapterhub.training import TrainOptions

    recommended = PluginManager(autoload=False).get_objective(name).recommended_options
    assert set(recommended) <= LEARNING_OPTIONS, f"{name} recommends {set(recommended) - LEARNING_OPTIONS}"
    options = TrainOptions.from_dict(dict(recommended))  # TrainOptions' own validation
    assert {k: getattr(options, k) for k in recommended} == recommended
    scale = PluginManager(autoload=False).get_objective(name).lr_scale
    assert scale is None or 0 < scale <= 1


def test_options_come_from_the_user_then_the_objective_then_the_method():
    from types import SimpleNamespace

    from adapterhub.training import TrainOptions

    method = SimpleNamespace(recommended_options={"lr": 1e-3, "epochs": 3.0, "warmup_steps": 5})
    objective = SimpleNamespace(recommended_options={"lr": 5e-5, "epochs": 1.0})
    options = TrainOptions.for_method(method, {"epochs": "2"}, objective)
    assert (options.lr, options.epochs, options.warmup_steps) == (5e-5, 2.0, 5)
    assert TrainOptions.for_method(method, {}, None).lr == 1e-3
    scaled = SimpleNamespace(recommended_options={}, lr_scale=0.2)  # a fraction of each method's own lr
    assert TrainOptions.for_method(method, {}, scaled).lr == pytest.approx(2e-4)
    assert TrainOptions.for_method(SimpleNamespace(recommended_options={"lr": 2e-2}), {}, scaled).lr == pytest.approx(4e-3)
    assert TrainOptions.for_method(method, {"lr": "0.01"}, scaled).lr == 0.01


def test_dpo_trains_a_lora_at_its_own_lr_and_lr_overrides_it(tiny_base_dir, prefs, tmp_path):
    manager = PluginManager(autoload=False)
    lora_lr = manager.get_method("lora").recommended_options["lr"]
    dpo_lr = lora_lr * manager.get_objective("dpo").lr_scale
    assert dpo_lr < lora_lr  # LoRA's SFT lr wrecks DPO

    def trained(out: Path, *flags: str) -> dict:
        assert main(["train", "--plugin", "lora", "--objective", "dpo", "--base", str(tiny_base_dir), "--data",
                     str(prefs), "--no-publish", "--output", str(out), "--max-steps", "1", "--no-progress",
                     *flags]) == 0
        return json.loads((out / "adapterhub.json").read_text())["training"]

    recommended = {**manager.get_method("lora").recommended_options, "lr": pytest.approx(dpo_lr)}
    training = trained(tmp_path / "recommended")
    assert {k: training[k] for k in recommended} == recommended
    assert trained(tmp_path / "flag", "--lr", "0.003")["lr"] == 0.003


def test_objectives_shows_the_options_an_objective_brings(capsys):
    assert main(["objectives", "--objective", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "training options (over the method's recommended ones; flags override them):" in out
    for key, value in PluginManager(autoload=False).get_objective("dpo").recommended_options.items():
        assert f"    --{key.replace('_', '-')} {value}\n" in out
    assert f"    --lr: the method's recommended lr x {PluginManager(autoload=False).get_objective('dpo').lr_scale:g}\n" in out
    assert main(["objectives", "--objective", "sft"]) == 0
    assert "the method's recommended ones (this objective brings none of its own)" in capsys.readouterr().out


def test_sft_stays_the_default_and_records_its_lineage(capsys, tiny_base_dir, sentiment_data, registry):
    ref = train(capsys, tiny_base_dir, registry, "--plugin", "lora", "--data", str(sentiment_data[0]),
                "--task", "sft-default", "--max-steps", "2")
    training = manifest(registry, ref)["training"]
    assert training["objective"] == {"name": "sft", "config": {}}
    import hashlib

    assert training["data_sha256"] == hashlib.sha256(Path(sentiment_data[0]).read_bytes()).hexdigest()


# -- data shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("objective, line, message", [
    ("dpo", {"prompt": "hi", "chosen": "a"}, "missing 'rejected'"),
    ("dpo", {"prompt": "hi", "chosen": "a", "rejected": "a"}, "the same answer"),
    ("dpo", {"prompt": "hi", "messages": [], "chosen": "a", "rejected": "b"}, "exactly one of"),
    ("dpo", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "chosen": "a", "rejected": "b"}, "last turn must be from the user"),
    ("dpo", {"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant turn"),
    ("dpo", {"prompt": "hi", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
    ("kto", {"prompt": "hi", "completion": "a", "label": "yes"}, "'label' must be true"),
    ("dpo", "[1, 2]", "expected a JSON object"),
    ("dpo", "{not json", "invalid JSON"),
])
def test_a_bad_line_names_file_line_and_reason_before_the_base_loads(capsys, tmp_path, objective, line, message):
    good = preference_rows(1)[0] if objective == "dpo" else {"prompt": "hi", "completion": "a", "label": True}
    data = write(tmp_path / "data.jsonl", [good, line])
    missing_base = tmp_path / "no-base-here"  # the data is checked first: the base is never looked at
    code = main(["train", "--plugin", "lora", "--objective", objective, "--base", str(missing_base), "--data",
                 str(data), "--task", "t", "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: " in err and message in err, err


def test_kto_refuses_data_with_one_kind_of_label(tmp_path, tiny_base_dir):
    from adapterhub.pipeline import train_and_publish
    from adapterhub.training import TrainOptions

    manager = PluginManager(autoload=False)
    data = write(tmp_path / "good.jsonl", [{"prompt": "q", "completion": "a", "label": True}] * 4)
    method, kto = manager.get_method("lora"), manager.get_objective("kto")
    with pytest.raises(ConfigError, match="only good examples; KTO needs both"):
        train_and_publish(method, method.make_config({}), TrainOptions(max_steps=1, progress=False),
                          {"base": str(tiny_base_dir), "data": str(data), "no_publish": True}, kto, kto.make_config({}))


# -- dpo and kto learn, record lineage and serve -----------------------------------------------


@pytest.fixture(scope="module")
def dpo_lora(tmp_path_factory, tiny_base_dir, prefs, registry):
    """An SFT LoRA, then DPO continuing it (--from): the pipeline a user runs."""
    import contextlib
    import io

    def run(*args: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["train", "--base", str(tiny_base_dir), "--registry", str(registry), "--no-progress",
                         "--seed", "0", *args]) == 0
        return out.getvalue().strip().splitlines()[-1]

    from adapterhub.tasks import write_split

    sft_data, _ = write_split("sentiment", tmp_path_factory.mktemp("sft"), n_train=32, n_test=1)
    parent = run("--plugin", "lora", "--data", str(sft_data), "--task", "senti", "--max-steps", "3", "--lr", "1e-2")
    ref = run("--plugin", "lora", "--objective", "dpo", "--objective-set", "beta=0.5", "--data", str(prefs),
              "--task", "senti-dpo", "--from", parent, "--max-steps", "12", "--lr", "1e-2", "--batch-size", "8",
              "--logging-steps", "1", "--eval-split", "0.25")
    return parent, ref


def test_dpo_moves_the_preference_and_records_lineage(dpo_lora, registry, prefs):
    parent, ref = dpo_lora
    m = manifest(registry, ref)
    assert m["parent"] == parent and m["method"] == "lora"
    objective = m["training"]["objective"]
    assert objective == {"name": "dpo", "config": {"beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0},
                         "reference": "the base with the adapter disabled"}
    import hashlib

    assert m["training"]["data_sha256"] == hashlib.sha256(prefs.read_bytes()).hexdigest()
    assert m["metrics"]["train_loss"] < math.log(2)
    assert m["metrics"]["eval_rewards/accuracies"] > 0.5  # held-out pairs: chosen's implied reward wins
    assert m["metrics"]["eval_rewards/margins"] > 0


def test_dpo_reference_is_the_base_not_a_copy_of_the_starting_adapter(capsys, tmp_path, tiny_base_dir, prefs):
    """A fresh prefix changes the output from the start: measured against the BASE, the first DPO
    loss differs from ln 2; against a copy of the starting prefix (TRL's default) it would be ln 2."""
    out = tmp_path / "adapter"
    train(capsys, tiny_base_dir, tmp_path / "reg", "--plugin", "prefix", "--objective", "dpo", "--data", str(prefs),
          "--no-publish", "--output", str(out), "--max-steps", "1", "--logging-steps", "1")
    meta = json.loads((out / "adapterhub.json").read_text())
    assert meta["training"]["objective"]["reference"] == "the base with the adapter disabled"
    assert abs(meta["metrics"]["train_loss"] - math.log(2)) > 1e-3
    assert not (out / "ref").exists()  # the reference adapter TRL would add is not saved with it


def test_dpo_without_peft_precomputes_the_reference_and_learns(capsys, tmp_path, tiny_base_dir, prefs):
    out = tmp_path / "adapter"
    train(capsys, tiny_base_dir, tmp_path / "reg", "--plugin", "adapter", "--objective", "dpo", "--data", str(prefs),
          "--no-publish", "--output", str(out), "--max-steps", "8", "--lr", "1e-2", "--logging-steps", "1")
    meta = json.loads((out / "adapterhub.json").read_text())
    assert meta["training"]["objective"]["reference"].startswith("the base (the model as training started")
    assert meta["metrics"]["train_loss"] < math.log(2)
    assert meta["metrics"]["rewards/margins"] > 0


@pytest.fixture(scope="module")
def kto_adapter(tiny_base_dir, unpaired, registry):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--base", str(tiny_base_dir), "--registry", str(registry), "--no-progress", "--seed",
                     "0", "--plugin", "adapter", "--objective", "kto", "--data", str(unpaired), "--task", "senti-kto",
                     "--max-steps", "10", "--lr", "1e-2", "--logging-steps", "1"]) == 0
    return out.getvalue().strip().splitlines()[-1]


def test_kto_loss_falls(kto_adapter, registry):
    m = manifest(registry, kto_adapter)
    assert m["training"]["objective"]["name"] == "kto"
    assert m["training"]["objective"]["reference"].startswith("the base")
    assert m["metrics"]["train_loss"] < 0.5  # KTO's loss starts at 0.5 (sigmoid(0)) for each example


def test_preference_trained_adapters_serve_like_any_adapter(dpo_lora, kto_adapter, registry, tiny_base_dir,
                                                           tiny_tokenizer):
    """The server answers with the DPO LoRA and the KTO bottleneck adapter exactly as each method's
    own load generates offline."""
    from serve_helpers import running_server

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.data import render_prompt
    from adapterhub.generation import greedy_tokens
    from adapterhub.adapters import resolve_adapter_dir
    from adapterhub.serve.client import Client

    messages = [{"role": "user", "content": "sentiment?\n\nthe good day"}]
    prompt = tiny_tokenizer(render_prompt(tiny_tokenizer, messages), add_special_tokens=False)["input_ids"]
    with running_server(tiny_base_dir, registry, quantize="none") as server, \
            Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        for ref in (dpo_lora[1], kto_adapter):
            served = client.generate(messages=[("user", messages[0]["content"])], adapters=[ref], max_new_tokens=8)
            directory, _ = resolve_adapter_dir(ref, str(registry))
            _, model = load_adapter(load_base(tiny_base_dir, "none").model, directory)
            offline = greedy_tokens(model, tiny_tokenizer, [prompt], max_new_tokens=8)[0]
            assert list(served.token_ids) == offline, ref


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_are_labelled_experimental_and_learn(capsys, tmp_path, tiny_base_dir, prefs,
                                                                       objective):
    assert main(["objectives"]) == 0
    assert f"{objective} [experimental] (built-in)" in capsys.readouterr().out
    out = tmp_path / "adapter"
    train(capsys, tiny_base_dir, tmp_path / "reg", "--plugin", "lora", "--objective", objective, "--data", str(prefs),
          "--no-publish", "--output", str(out), "--max-steps", "12", "--lr", "1e-2", "--warmup-steps", "0",
          "--logging-steps", "1")
    meta = json.loads((out / "adapterhub.json").read_text())
    assert meta["training"]["objective"]["reference"] == "none (reference-free)"
    assert meta["metrics"]["loss_last"] < meta["metrics"]["loss_first"]
