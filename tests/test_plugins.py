"""The plugin system: built-ins and entry-point plugins by one path, isolation of broken plugins."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adapterhub
from adapterhub import hookspecs
from adapterhub.manager import DEFAULT_PLUGINS, DISABLE_AUTOLOAD_ENV, PluginManager

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "adapterhub", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def write_dist(site: Path, dist: str, entry: str, module: str, source: str) -> None:
    """A real installed-distribution layout: module + dist-info with entry_points.txt."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[adapterhub]\n{entry} = {module}\n")


def test_builtins_register_through_default_plugins():
    manager = PluginManager(autoload=False)
    methods = manager.methods()
    assert "lora" in methods
    assert all(m.origin == "built-in" for m in methods.values())
    assert len(methods) >= len(DEFAULT_PLUGINS)
    assert manager.broken == []


def test_example_plugin_found_through_entry_point_metadata():
    """The example package is pip-installed (make venv); discovery uses its real dist metadata."""
    import importlib.metadata

    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="adapterhub")}
    assert "loha" in eps, "examples/adapterhub-plugin-example is not installed in this venv (run make venv)"
    method = PluginManager(autoload=True).get_method("loha")
    assert method.origin == "adapterhub-plugin-example"


def test_env_var_blocks_entry_point_autoload():
    shown = run_cli("plugins", "--json", env={DISABLE_AUTOLOAD_ENV: "1"})
    assert shown.returncode == 0, shown.stderr
    names = {row["name"] for row in json.loads(shown.stdout)}
    assert "lora" in names and "loha" not in names
    shown = run_cli("plugins", "--json", env={DISABLE_AUTOLOAD_ENV: ""})
    assert "loha" in {row["name"] for row in json.loads(shown.stdout)}


def test_broken_plugin_is_reported_and_others_still_work(tmp_path):
    write_dist(tmp_path, "adapterhub-plugin-broken", "broken", "broken_plugin", "raise ImportError('no module named torchx')\n")
    write_dist(
        tmp_path, "adapterhub-plugin-badreg", "badreg", "badreg_plugin",
        "import adapterhub\n@adapterhub.hookimpl\ndef adapterhub_register_methods(register):\n    raise RuntimeError('boom')\n",
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", DISABLE_AUTOLOAD_ENV: ""}
    shown = run_cli("plugins", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    rows = {row["name"]: row for row in json.loads(shown.stdout)}
    assert rows["broken"]["status"] == "broken" and "torchx" in rows["broken"]["error"]
    assert rows["broken"]["origin"] == "adapterhub-plugin-broken"
    assert rows["badreg"]["status"] == "broken" and "boom" in rows["badreg"]["error"]
    assert rows["lora"]["status"] == "ok" and rows["loha"]["status"] == "ok"
    text = run_cli("plugins", env=env)
    assert "BROKEN" in text.stdout and "torchx" in text.stdout
    asked = run_cli("train", "--plugin", "broken", "--base", "x", "--data", "y", "--task", "t", env=env)
    assert asked.returncode != 0 and "broken" in asked.stderr and "Traceback" not in asked.stderr


def test_duplicate_method_name_is_reported(plugin_manager):
    from adapterhub.plugins.lora import LoraMethod

    class Dup:
        @adapterhub.hookimpl
        def adapterhub_register_methods(self, register):
            register(LoraMethod())

    plugin_manager.register(Dup(), name="dup")
    try:
        assert plugin_manager.get_method("lora").origin == "built-in"
        assert any("already provided" in b.error for b in plugin_manager.broken)
    finally:
        plugin_manager.unregister("dup")
    assert not plugin_manager.broken


def test_unknown_method_error_lists_available(plugin_manager):
    with pytest.raises(adapterhub.PluginError, match="unknown method plugin 'nope'.*lora"):
        plugin_manager.get_method("nope")


def test_trainer_callbacks_hook_runs_during_training(plugin_manager, tiny_base_dir, sentiment_dataset, tiny_tokenizer):
    from transformers import TrainerCallback

    from adapterhub.base import load_base
    from adapterhub.training import TrainOptions

    seen: list[int] = []

    class Counter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    class CallbackPlugin:
        @adapterhub.hookimpl
        def adapterhub_trainer_callbacks(self, method, options):
            return [Counter()]

    plugin_manager.register(CallbackPlugin(), name="counter")
    try:
        method = plugin_manager.get_method("lora")
        options = TrainOptions(max_steps=3, batch_size=4, progress=False)
        callbacks = plugin_manager.trainer_callbacks(method, options)
        model = load_base(tiny_base_dir).model
        method.train(model, sentiment_dataset, method.make_config({"r": 2}), options, tokenizer=tiny_tokenizer,
                     callbacks=callbacks)
    finally:
        plugin_manager.unregister("counter")
    assert seen == [1, 2, 3]


def test_example_plugin_trains_with_the_cli(tmp_path, tiny_base_dir, sentiment_data):
    out = tmp_path / "loha"
    done = run_cli("train", "--plugin", "loha", "--base", str(tiny_base_dir), "--data", str(sentiment_data[0]),
                   "--no-publish", "--output", str(out), "--max-steps", "3", "--batch-size", "4", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    meta = json.loads((out / "adapterhub.json").read_text())
    assert meta["method"] == "loha"
    assert (out / "adapter_model.safetensors").is_file()


# -- commands: the CLI's command groups come through a hook ----------------------------------------


class HelloCommand:
    """A plugin adding ``adapterhub hello`` the way the registry and the server add theirs."""

    @adapterhub.hookimpl
    def adapterhub_register_commands(self, subparsers):
        hello = subparsers.add_parser("hello", help="say hello from a plugin")
        hello.add_argument("--name", default="world")
        hello.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)


def test_a_plugin_adds_a_command_through_the_hook(plugin_manager, capsys):
    import re

    from adapterhub.cli import main

    plugin_manager.register(HelloCommand(), name="hello")
    try:
        assert main(["hello", "--name", "adapters"]) == 3
        assert capsys.readouterr().out == "hello adapters\n"
        with pytest.raises(SystemExit):
            main(["--help"])
        listed = re.findall(r"^    (\w+) ", capsys.readouterr().out, re.M)
        assert listed[-5:] == ["registry", "serve", "generate", "score", "hello"], listed  # built-in groups first
        plugin_manager.register(HelloCommand(), name="hello-again")  # the same name twice: reported, not fatal
        assert main(["hello"]) == 3
        assert any(b.name == "hello-again" and "conflicting subparser: hello" in b.error for b in plugin_manager.broken)
    finally:
        plugin_manager.unregister("hello")
        plugin_manager.unregister("hello-again")


def test_the_builtin_command_groups_are_plugins_of_the_hook(capsys):
    """No command group is wired into the CLI by hand: without the built-in command plugins there is
    no ``registry`` command; with them, ``registry`` and ``serve`` come from those modules' hook."""
    from adapterhub.cli import build_parser
    from adapterhub.manager import COMMAND_PLUGINS, reset_manager
    from adapterhub.objectives import score_cli
    from adapterhub.registry import cli as registry_cli
    from adapterhub.serve import cli as serve_cli

    assert set(COMMAND_PLUGINS) == {registry_cli.__name__, serve_cli.__name__, score_cli.__name__}
    assert all(hasattr(m, "adapterhub_register_commands") for m in (registry_cli, serve_cli, score_cli))
    reset_manager(PluginManager(autoload=False, commands=()))
    try:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["registry", "list"])
    finally:
        reset_manager(None)
    assert "invalid choice: 'registry'" in capsys.readouterr().err


def test_an_installed_plugin_adds_a_command_and_the_cli_stays_light(tmp_path):
    """An entry-point plugin's command runs from the real CLI; building the parser (every
    invocation) imports no method plugin and no torch."""
    write_dist(tmp_path, "adapterhub-plugin-greet", "greet", "greet_plugin",
               "import adapterhub\n\n@adapterhub.hookimpl\ndef adapterhub_register_commands(subparsers):\n"
               "    p = subparsers.add_parser('greet', help='greet from an installed plugin')\n"
               "    p.set_defaults(func=lambda args: print('greetings'))\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", DISABLE_AUTOLOAD_ENV: ""}
    done = run_cli("greet", env=env)
    assert done.returncode == 0 and done.stdout == "greetings\n", done.stderr
    assert "greet from an installed plugin" in run_cli("--help", env=env).stdout
    assert run_cli("greet", env={**env, DISABLE_AUTOLOAD_ENV: "1"}).returncode != 0
    code = ("import sys; from adapterhub.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m in ('torch', 'peft', 'transformers') or m.startswith('adapterhub.plugins')))")
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                           check=True)
    assert light.stdout.strip() == "[]"


# -- meta-tests: every hook is documented and exercised --------------------------------------------

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("adapterhub_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 80 and "Called" in doc, f"hook {hook} needs a docstring saying when it is called"
    assert "return" in doc.lower(), f"hook {hook}'s docstring must say what its return value means"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    """A hook no test implements is a hook nobody knows works (datasette's meta-test)."""
    this = Path(__file__).resolve()
    sources = [p.read_text() for p in this.parent.glob("test_*.py")]
    implementations = sum(f"def {hook}(" in s for s in sources)
    assert implementations >= 1, f"no test implements hook {hook}"
    assert f"def {hook}(" in (ROOT / "README.md").read_text(), f"README's plugin guide does not show {hook}"


def test_peft_formats_come_from_the_plugins_and_the_registry_copy_matches():
    """Which method reads a plain PEFT directory is what the methods declare (``peft_type``,
    ``peft_variant``); the registry's torch-free copy for the built-ins must say the same."""
    from adapterhub.metadata import BUILTIN_PEFT_FORMATS

    manager = PluginManager(autoload=False)
    assert BUILTIN_PEFT_FORMATS == manager.peft_formats(), \
        "adapterhub.metadata.BUILTIN_PEFT_FORMATS is stale: python -m adapterhub.capabilities_table --write README.md"
    assert ("LORA", "use_dora") in BUILTIN_PEFT_FORMATS and ("LORA", None) in BUILTIN_PEFT_FORMATS
    for (peft_type, variant), name in BUILTIN_PEFT_FORMATS.items():
        method = manager.get_method(name)
        assert (method.peft_type, method.peft_variant) == (peft_type, variant)
        config = {"peft_type": peft_type, **({variant: True} if variant else {})}
        assert manager.method_for_peft_config(config) is method
    assert manager.method_for_peft_config({"peft_type": "LORA", "use_dora": False}).name == "lora"
    assert manager.method_for_peft_config({"peft_type": "MYSTERY"}) is None
    for name in ("qlora", "loraplus"):  # same format as lora, registered after it
        assert manager.get_method(name).peft_type == "LORA" and manager.peft_formats()["LORA", None] == "lora"


def test_a_plugin_declares_the_peft_format_it_reads(plugin_manager, tmp_path):
    """A third-party method's ``peft_type`` / ``peft_variant`` is all it takes for the host and the
    registry to read plain PEFT directories of its format: no table to edit."""
    from adapterhub.plugins.lora import LoraMethod
    from adapterhub.registry.adapterdir import infer_method

    class Vera(adapterhub.Method):
        name = "vera-test"
        description = "a format of its own"
        peft_type = "VERA"

    class RsLora(LoraMethod):
        name = "rslora-test"
        peft_variant = "use_rslora"

    class Formats:
        @adapterhub.hookimpl
        def adapterhub_register_methods(self, register):
            register(Vera())
            register(RsLora())

    plugin_manager.register(Formats(), name="formats")
    assert plugin_manager.method_for_peft_config({"peft_type": "VERA"}).name == "vera-test"
    assert plugin_manager.method_for_peft_config({"peft_type": "LORA", "use_rslora": True}).name == "rslora-test"
    assert plugin_manager.method_for_peft_config({"peft_type": "LORA"}).name == "lora"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    assert infer_method(tmp_path)[0] == "vera-test"  # the registry asks the plugins for a format it has no copy of
