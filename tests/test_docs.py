"""The README stays true: generated tables are current, the quickstart commands exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_methods_table_is_generated_from_the_plugins(tiny_base_dir):
    from adapterhub.capabilities_table import BEGIN, END, render

    readme = (ROOT / "README.md").read_text()
    current = readme.split(BEGIN)[1].split(END)[0].strip()
    assert current == render(tiny_base_dir), "README methods table is stale: python -m adapterhub.capabilities_table --write README.md"


def test_method_config_keys_are_generated_from_the_plugins():
    from adapterhub.capabilities_table import KEYS_BEGIN, KEYS_END, render_config_keys

    readme = (ROOT / "README.md").read_text()
    current = readme.split(KEYS_BEGIN)[1].split(KEYS_END)[0].strip()
    assert current == render_config_keys(), "README config keys are stale: python -m adapterhub.capabilities_table --write README.md"


def test_method_defaults_table_is_generated_from_the_plugins():
    from adapterhub.capabilities_table import DEFAULTS_BEGIN, DEFAULTS_END, render_defaults

    readme = (ROOT / "README.md").read_text()
    current = readme.split(DEFAULTS_BEGIN)[1].split(DEFAULTS_END)[0].strip()
    assert current == render_defaults(), "README method defaults are stale: python -m adapterhub.capabilities_table --write README.md"


def test_objective_defaults_table_is_generated_from_the_objectives():
    from adapterhub.capabilities_table import OBJECTIVES_BEGIN, OBJECTIVES_END, render_objective_defaults

    readme = (ROOT / "README.md").read_text()
    current = readme.split(OBJECTIVES_BEGIN)[1].split(OBJECTIVES_END)[0].strip()
    assert current == render_objective_defaults(), \
        "README objective defaults are stale: python -m adapterhub.capabilities_table --write README.md"


def test_quickstart_is_two_make_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_builtin_method_is_documented():
    from adapterhub.manager import PluginManager

    readme = (ROOT / "README.md").read_text()
    for name in PluginManager(autoload=False).methods():
        assert f"`{name}`" in readme, f"README does not mention method {name}"
