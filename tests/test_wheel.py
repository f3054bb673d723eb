"""The wheel is what users install: build it, install it with its dependencies into a clean venv
outside the checkout, and run train -> publish -> serve -> generate on the tiny base from it.

Editable installs hide files the wheel forgets (the generated gRPC modules once were); this test
imports nothing from the checkout. It costs about two minutes (a venv with torch and transformers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path, env: dict, timeout: float = 900) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy of what git would commit: setuptools would reuse (and leave) a build/ folder in the
    # checkout, stale files and all, and a dev checkout holds gigabytes of demo and bench output
    source = out / "source"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_symlink():  # hub_core/{plugins,registry,serve}: as a clone has them
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source), cwd=out,
         env=dict(os.environ))
    (found,) = out.glob("adapterhub-*.whl")
    return found


def test_the_wheel_carries_the_generated_grpc_modules_and_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("inference_pb2.py", "inference_pb2_grpc.py", "admin_pb2.py", "admin_pb2_grpc.py", "inference.proto",
                   "admin.proto"):
        assert f"adapterhub/serve/_proto/{module}" in names
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    on_disk = set()
    for top, name in (("hub_core", "adapterhub"), ("plugins", "adapterhub.plugins"),
                      ("registry", "adapterhub.registry"), ("serve", "adapterhub.serve")):
        for init in (ROOT / top).rglob("__init__.py"):
            inner = init.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((name, *inner)))
    assert on_disk <= packages, f"packages missing from the wheel: {sorted(on_disk - packages)}"


def test_train_publish_serve_generate_from_an_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["ADAPTERHUB_CACHE"] = str(tmp_path / "cache")
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    _run(*pip, "torch==2.13.0", cwd=tmp_path, env=env)
    _run(*pip, str(wheel), cwd=tmp_path, env=env)
    hub = str(venv / "bin" / "adapterhub")
    where = _run(str(venv / "bin" / "python"), "-c", "import adapterhub, sys; print(adapterhub.__file__)",
                 cwd=tmp_path, env=env)
    assert str(ROOT) not in where and str(venv) in where  # the installed copy, not the checkout

    base, registry = tmp_path / "base", tmp_path / "registry"
    _run(hub, "base", "init", "--preset", "tiny", "--out", str(base), cwd=tmp_path, env=env)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": "say", "input": f"word {i}", "output": "yes"}) + "\n"
                            for i in range(8)))
    out = _run(hub, "train", "--plugin", "lora", "--base", str(base), "--data", str(data), "--task", "smoke",
               "--registry", str(registry), "--max-steps", "2", "--no-progress", cwd=tmp_path, env=env)
    assert out.strip().splitlines()[-1].endswith("smoke@1")

    server = subprocess.Popen([hub, "serve", "--base", str(base), "--registry", str(registry), "--quantize", "none",
                               "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        port = None
        for line in server.stdout:
            if match := re.search(r"serving on [^:]+:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the server never said where it listens"
        answer = _run(hub, "generate", "--server", f"127.0.0.1:{port}", "--adapter", "smoke@1", "--max-new-tokens",
                      "4", "say word 1", cwd=tmp_path, env=env, timeout=120)
        assert answer.strip()
    finally:
        server.terminate()
        server.wait(timeout=60)
