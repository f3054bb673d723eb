"""Per-method recommended training defaults: valid, shown by `adapterhub plugins`, overridden by flags.

The values themselves were measured on SmolLM2-135M-Instruct (see each plugin's comment and
``examples/method_accuracy.py``); these tests keep them well-formed and wired through, on the tiny base.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from adapterhub.manager import PluginManager
from adapterhub.training import TrainOptions

# What a method may recommend: how it learns. Where the data, logs and checkpoints go, the batch a
# machine can hold and evaluation are the user's business, not the method's.
LEARNING_OPTIONS = {"lr", "epochs", "warmup_steps", "scheduler", "weight_decay", "max_grad_norm"}

ALL_METHODS = sorted(PluginManager(autoload=True).methods())


@pytest.fixture
def manager(installed_plugin_manager):
    return installed_plugin_manager


def test_every_builtin_method_and_the_example_plugin_are_covered():
    assert {"lora", "qlora", "dora", "adalora", "loraplus", "ia3", "adapter", "prefix", "prompt", "ptuning",
            "bitfit", "sparse", "freeze", "full", "loha"} <= set(ALL_METHODS)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_recommended_options_are_valid_train_options(name, manager):
    method = manager.get_method(name)
    recommended = method.recommended_options
    assert set(recommended) <= LEARNING_OPTIONS, f"{name} recommends {set(recommended) - LEARNING_OPTIONS}"
    assert {"lr", "epochs"} <= set(recommended), f"{name}: the general lr and length do not learn on a real base"
    hints = typing.get_type_hints(TrainOptions)
    for key, value in recommended.items():
        assert type(value) is hints[key], f"{name}: {key}={value!r} is not a {hints[key].__name__}"
    options = TrainOptions.for_method(method, {})  # runs TrainOptions' own validation
    assert {k: getattr(options, k) for k in recommended} == recommended
    assert options.max_steps == -1, f"{name}: a recommended max_steps would silently override a user's --epochs"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_recommended_learning_rate_differs_from_the_general_default(name, manager):
    """The general lr (2e-4) is no method's measured best on the real base; each names its own."""
    assert manager.get_method(name).recommended_options["lr"] != TrainOptions().lr


@pytest.mark.parametrize("name", ALL_METHODS)
def test_train_help_says_a_recommended_option_defaults_to_the_methods_value(name, manager):
    """`train --help` once quoted lr's general default (2e-4) where LoRA trains at 1e-3 (issue 32)."""
    import argparse

    from adapterhub.cli import build_parser

    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for key in manager.get_method(name).recommended_options:
        entry = train._option_string_actions["--" + key.replace("_", "-")].help
        assert "method's recommended value" in entry and "plugins --method NAME" in entry, (key, entry)


def test_adalora_plans_its_rank_schedule_from_the_recommended_epochs(manager):
    from adapterhub.plugins.adalora import planned_steps

    method = manager.get_method("adalora")
    options = TrainOptions.for_method(method, {})
    steps = planned_steps(options, num_examples=200)
    assert steps == int(options.epochs * 25)  # 200 examples at batch 8
    schedule = method.make_config({}).schedule(steps)
    assert 0 < schedule["tinit"] < schedule["total_step"] - schedule["tfinal"]  # a pruning phase is left


@pytest.mark.parametrize("name", ["lora", "prompt", "loha"])
def test_plugins_method_shows_the_recommended_options(name, manager, capsys):
    from adapterhub.cli import main

    assert main(["plugins", "--method", name]) == 0
    text = capsys.readouterr().out
    defaults = TrainOptions()
    for key, value in manager.get_method(name).recommended_options.items():
        assert f"--{key.replace('_', '-')} {value} (general default {getattr(defaults, key)})" in text
    assert main(["plugins", "--method", name, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["recommended_options"] == manager.get_method(name).recommended_options


def _train(tiny_base_dir, data, out, *flags):
    from adapterhub.cli import main

    code = main(["train", "--plugin", "prompt", "--base", str(tiny_base_dir), "--data", str(data), "--no-publish",
                 "--output", str(out), "--batch-size", "16", "--no-progress", *flags])
    assert code == 0
    return json.loads((out / "adapterhub.json").read_text())["training"]


def test_train_without_flags_uses_the_methods_recommendations(tiny_base_dir, sentiment_data, tmp_path, manager):
    recommended = manager.get_method("prompt").recommended_options
    training = _train(tiny_base_dir, sentiment_data[0], tmp_path / "a", "--max-steps", "1")
    assert {k: training[k] for k in recommended} == recommended


def test_user_flags_override_the_recommendations(tiny_base_dir, sentiment_data, tmp_path, manager):
    recommended = manager.get_method("prompt").recommended_options
    asked = {"lr": 0.5, "epochs": 0.25, "warmup_steps": 1}
    assert all(recommended.get(k) != v for k, v in asked.items())
    flags = [x for k, v in asked.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    training = _train(tiny_base_dir, sentiment_data[0], tmp_path / "b", *flags)
    assert {k: training[k] for k in asked} == asked
    assert training["max_steps"] == -1  # the user's --epochs decides the length
    kept = {k: v for k, v in recommended.items() if k not in asked}
    assert {k: training[k] for k in kept} == kept


def test_yaml_config_overrides_the_recommendations_too(tiny_base_dir, sentiment_data, tmp_path, manager):
    from adapterhub.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(f"plugin: prompt\nbase: {tiny_base_dir}\ndata: {sentiment_data[0]}\nno_publish: true\n"
                      f"output: {tmp_path / 'c'}\nlr: 0.25\nmax_steps: 1\nprogress: false\nbatch_size: 16\n")
    assert main(["train", "--config", str(config)]) == 0
    training = json.loads((tmp_path / "c" / "adapterhub.json").read_text())["training"]
    assert training["lr"] == 0.25
    assert training["epochs"] == manager.get_method("prompt").recommended_options["epochs"]


def test_options_fields_used_here_exist():
    """The names this file relies on are TrainOptions fields (a rename must update the plugins)."""
    assert LEARNING_OPTIONS <= {f.name for f in dataclasses.fields(TrainOptions)}
