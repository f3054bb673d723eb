"""The layers of DESIGN.md hold: `lint-imports` keeps the contracts in `.importlinter`, every module
sits in a layer, and no two modules import each other in a cycle.

grimp (under import-linter) finds a package's modules by walking its directory. adapterhub's
subpackages live in folders of their own beside `hub_core/` (joined by setuptools' package-dir
mapping), so `hub_core/` holds a symlink to each (`plugins`, `registry`, `serve`): a plain
`lint-imports` in the checkout sees the whole package, laid out as the wheel is.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"


@pytest.fixture(scope="module")
def graph():
    import grimp

    return grimp.build_graph("adapterhub", include_external_packages=False, exclude_type_checking_imports=True)


def test_the_subpackage_links_point_at_their_folders():
    for name in ("plugins", "registry", "serve"):
        link = ROOT / "hub_core" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), f"hub_core/{name} -> ../{name}"


def test_lint_imports_keeps_every_contract():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout


def _layer_entries() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    layers = parser["importlinter:contract:layers"]["layers"]
    return [name.strip() for line in layers.splitlines() for name in line.replace("|", ":").split(":") if name.strip()]


def test_every_module_sits_in_a_layer(graph):
    """A new module outside every layer would escape the contract: name it in `.importlinter`."""
    assert {"adapterhub.serve.engine", "adapterhub.registry.store", "adapterhub.plugins.lora"} <= set(graph.modules)
    entries = _layer_entries()
    loose = sorted(m for m in graph.modules
                   if m not in ("adapterhub", "adapterhub.objectives")
                   and not any(m == e or m.startswith(e + ".") for e in entries))
    assert not loose, f"modules in no layer of .importlinter: {loose}"


def test_no_import_cycles(graph):
    """Strongly connected groups of modules (Tarjan), counting imports inside functions too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_import_adapterhub_and_the_cli_parser_stay_free_of_torch():
    code = ("import sys, adapterhub, adapterhub.cli; adapterhub.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
