"""The benchmark harness (``bench/``) where it can be checked without running a benchmark or vLLM.

Each check runs in a fresh interpreter from the checkout's root (``bench`` is a folder of the
checkout, not an installed package), as ``python -m bench`` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, unset: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != unset}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False, env=env)


def test_every_benchmark_resolves_to_a_module_by_its_name_and_by_its_module_name():
    done = _python(
        "import json\n"
        "from bench.__main__ import BENCHMARKS, MODULES, resolve\n"
        "modules = {n: MODULES.get(n, n) for n in BENCHMARKS}\n"
        "print(json.dumps({'modules': modules, 'by_name': resolve(list(BENCHMARKS)),\n"
        "                  'by_module': resolve(list(modules.values())), 'bogus': resolve(['nope', 'vllm'])}))")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    names = list(got["modules"])
    assert "http_peer" in names
    for module in got["modules"].values():
        assert (ROOT / "bench" / f"{module}.py").is_file(), module
    assert got["by_name"] == [names, []]
    assert got["by_module"] == [names, []]  # vllm_peer (the file its docstring names) is vllm
    assert got["bogus"] == [["vllm"], ["nope"]]
    cli = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert cli.returncode == 2 and "nope" in cli.stderr and "vllm_peer" in cli.stderr


def test_worker_env_preloads_the_venvs_own_libiomp5_through_its_python_symlink(tmp_path):
    """A venv's ``bin/python`` links to the interpreter it was made from; ``lib/libiomp5.so`` is the
    venv's, so it must be found from the link's own folder, not from where the link leads."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").mkdir()
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    (venv / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    code = f"import json; from bench.vllm_peer import worker_env; print(json.dumps(worker_env({str(venv / 'bin' / 'python')!r})))"
    done = _python(code, unset="LD_PRELOAD")
    assert done.returncode == 0, done.stderr
    preload = json.loads(done.stdout)["LD_PRELOAD"].split(":")
    assert str(venv / "lib" / "libiomp5.so") in preload
