"""The registry CLI verbs, run as a user runs them: ``python -m adapterhub.registry ...`` subprocesses."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from registry_helpers import FINGERPRINT, make_adapter

from adapterhub.registry import open_registry
from adapterhub.registry.cli import add_registry_parser


def cli(*args: str, registry: Path | None = None, env: dict | None = None, check: int | None = 0):
    command = [sys.executable, "-m", "adapterhub.registry", *args]
    if registry is not None:
        command += ["--registry", str(registry)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)
    if check is not None:
        assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
    return result


def cli_json(*args: str, registry: Path):
    return json.loads(cli(*args, "--json", registry=registry).stdout)


@pytest.fixture
def populated(tmp_path):
    """A registry with t@1, t@2 (tagged prod) published through the API."""
    store = open_registry(tmp_path / "registry")
    store.publish("t", make_adapter(tmp_path / "a1", seed=1))
    store.publish("t", make_adapter(tmp_path / "a2", seed=2))
    store.set_tag("t@2", "prod")
    return store


def test_import_list_show_and_tag(tmp_path):
    registry = tmp_path / "registry"
    adapter = make_adapter(tmp_path / "adapter", seed=3)
    assert cli_json("import", str(adapter), "--task", "sentiment", registry=registry)["version"] == 1
    cli("import", str(adapter), "--task", "sentiment", registry=registry)
    tasks = cli_json("list", registry=registry)
    assert tasks == [{"task": "sentiment", "versions": 2, "latest": 2, "tags": {}}]
    assert cli_json("tag", "sentiment@1", "prod", registry=registry) == {"tag": "sentiment@prod", "ref": "sentiment@1"}
    versions = cli_json("list", "sentiment", registry=registry)
    assert [(v["ref"], v["tags"]) for v in versions] == [("sentiment@1", ["prod"]), ("sentiment@2", ["latest"])]
    shown = cli_json("show", "sentiment@prod", registry=registry)
    assert shown["version"] == 1 and shown["base"]["fingerprint"] == FINGERPRINT
    assert "sentiment@1" in cli("list", "sentiment", registry=registry).stdout  # human output too


def test_registry_location_from_option_position_and_environment(populated):
    registry = populated.root
    before_verb = subprocess.run(
        [sys.executable, "-m", "adapterhub.registry", "registry", "--registry", str(registry), "list", "--json"],
        capture_output=True, text=True, check=True)
    assert json.loads(before_verb.stdout)[0]["task"] == "t"
    from_env = cli("list", "--json", env={"ADAPTERHUB_HOME": str(registry)})
    assert json.loads(from_env.stdout)[0]["latest"] == 2


def test_rm_refuses_tagged_unless_forced_then_untag(populated):
    registry = populated.root
    refused = cli("rm", "t@2", registry=registry, check=2)
    assert refused.stderr.startswith("error: ") and "tagged prod" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    cli("rm", "t", registry=registry, check=2)  # bare task refused: too easy to delete latest by accident
    assert cli_json("rm", "t@1", registry=registry) == {"removed": "t@1"}
    assert cli_json("untag", "t", "prod", registry=registry) == {"removed": "t@prod", "was": 2}
    cli("rm", "t@2", registry=registry)
    assert cli_json("list", registry=registry) == []
    report = cli_json("gc", registry=registry)
    assert len(report["blobs_removed"]) == 3 and report["bytes_freed"] > 0


def test_rm_force_removes_tagged_version(populated):
    cli("rm", "t@prod", "--force", registry=populated.root)
    assert populated.list_versions("t") == [1] and populated.tags("t") == {}


def test_verify_reports_problems_with_exit_1(populated):
    registry = populated.root
    assert cli_json("verify", registry=registry) == {"ok": True, "problems": []}
    blob = registry / "blobs" / populated.manifest("t@1").files["adapter_model.safetensors"].sha256
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    result = cli("verify", "--json", registry=registry, check=1)
    problems = json.loads(result.stdout)["problems"]
    assert any(p["path"] == "t@1:adapter_model.safetensors" for p in problems)
    assert cli("verify", "t@2", registry=registry).returncode == 0  # scoped to a healthy version
    human = cli("verify", registry=registry, check=1)
    assert "adapter_model.safetensors" in human.stdout
    refused = cli("export", "t@1", "--out", str(registry.parent / "x"), registry=registry, check=2)
    assert "adapter_model.safetensors" in refused.stderr and "sha256" in refused.stderr


def test_export_and_import_plain_peft(populated, tmp_path):
    registry = populated.root
    out = tmp_path / "exported"
    cli("export", "t@prod", "--out", str(out), registry=registry)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "manifest.json"]
    plain = make_adapter(tmp_path / "plain", seed=7, metadata=False)
    missing_base = cli("import", str(plain), "--task", "p", registry=registry, check=2)
    assert "--base" in missing_base.stderr
    imported = cli_json("import", str(plain), "--task", "p", "--base-fingerprint", FINGERPRINT, registry=registry)
    assert imported["method"]["name"] == "lora" and imported["base"]["fingerprint"] == FINGERPRINT


def test_push_dry_run_lists_uploads_and_pull_imports_a_local_snapshot(populated, tmp_path):
    registry = populated.root
    plan = cli_json("push", "t@prod", "--repo", "me/t", "--dry-run", registry=registry)
    assert plan == {"ref": "t@2", "repo": "me/t",
                    "files": ["adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "manifest.json"]}
    snapshot = tmp_path / "snapshot"
    cli("export", "t@1", "--out", str(snapshot), registry=registry)
    pulled = cli_json("pull", str(snapshot), "--task", "pulled", registry=registry)
    assert pulled["task"] == "pulled" and pulled["files"] == populated.manifest("t@1").to_dict()["files"]


@pytest.mark.parametrize("args, fragment", [
    (["show", "a@"], "nothing after '@'"),
    (["show", "../x"], "not allowed"),
    (["show", "t@9"], "t@9 does not exist"),
    (["tag", "t@1", "42"], "purely numeric"),
    (["import", "/nonexistent", "--task", "t"], "does not exist"),
])
def test_expected_errors_print_one_line_and_exit_2(populated, args, fragment):
    result = cli(*args, registry=populated.root, check=2)
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_add_registry_parser_plugs_into_a_host_cli(populated, capsys):
    """What hub_core/cli.py does: add the subcommand, parse, call args.func(args) -> exit code."""
    parser = argparse.ArgumentParser(prog="adapterhub")
    parser.add_argument("--registry", default=None)  # a host-level option must not be clobbered
    add_registry_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--registry", str(populated.root), "registry", "list", "t", "--json"])
    assert args.func(args) == 0
    assert [row["ref"] for row in json.loads(capsys.readouterr().out)] == ["t@1", "t@2"]
    verbs = {"list": [], "show": ["t"], "tag": ["t@1", "x"], "untag": ["t", "x"], "rm": ["t@1"], "gc": [],
             "verify": [], "export": ["t", "--out", "o"], "import": ["d", "--task", "t"],
             "push": ["t", "--repo", "r"], "pull": ["r", "--task", "t"]}
    for verb, rest in verbs.items():
        parsed = parser.parse_args(["registry", verb, *rest, "--json", "--registry", "elsewhere"])
        assert parsed.json and callable(parsed.func) and parsed.registry == "elsewhere"
    usage = cli("--help").stdout
    assert all(verb in usage for verb in verbs)


def test_registry_imports_stay_light():
    """Publishers and the CLI start fast: no torch, transformers or huggingface_hub at import."""
    code = ("import sys, adapterhub.registry, adapterhub.registry.cli, adapterhub.registry.remote; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'huggingface_hub') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_registry_infers_a_plain_peft_dirs_method_without_the_plugins(tmp_path):
    """``registry import`` of a plain PEFT dir tells its method (DoRA by its flag) without torch."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    code = ("import sys; from adapterhub.registry.adapterdir import infer_method; "
            f"print(infer_method(__import__('pathlib').Path({str(tmp_path)!r}))[0], "
            "sorted(m for m in ('torch', 'peft', 'adapterhub.plugins.dora') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "dora []"


@contextlib.contextmanager
def mounted(directory: Path, *options: str, kind: str = "tmpfs"):
    """``directory`` as a real tmpfs (``size=...``) or a read-only bind of itself; skipped where
    mounting is not allowed (not root)."""
    directory.mkdir(parents=True, exist_ok=True)
    commands = ([["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(directory)]] if kind == "tmpfs" else
                [["mount", "--bind", str(directory), str(directory)],
                 ["mount", "-o", "remount,bind,ro", str(directory)]])
    done = 0
    try:
        for command in commands:
            if subprocess.run(command, capture_output=True).returncode != 0:
                pytest.skip(f"cannot {' '.join(command[:3])} here (needs root)")
            done += 1
        yield directory
    finally:
        if done:
            subprocess.run(["umount", str(directory)], check=True)


def main_cli(*args: str, registry: Path):
    """The main CLI, as README promises it: `adapterhub registry VERB ... --registry DIR`."""
    return subprocess.run([sys.executable, "-m", "adapterhub", "registry", *args, "--registry", str(registry)],
                          capture_output=True, text=True, timeout=60)


def _one_error_line(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_import_on_a_full_disk_is_one_error_line_and_exit_2(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", seed=5, size=4096)  # 128 KB: more than the disk
    with mounted(tmp_path / "full", "size=64k") as registry:
        result = main_cli("import", str(adapter), "--task", "t", registry=registry)
    _one_error_line(result, "registry import", "No space left on device", "--registry")


def test_import_and_tag_on_a_read_only_registry_are_one_error_line_and_exit_2(tmp_path, populated):
    adapter = make_adapter(tmp_path / "adapter", seed=6)
    with mounted(populated.root, kind="bind-ro") as registry:
        tagged = main_cli("tag", "t@1", "prod", registry=registry)
        imported = main_cli("import", str(adapter), "--task", "t", registry=registry)
    _one_error_line(tagged, "registry tag", "Read-only file system")
    _one_error_line(imported, "registry import", "Read-only file system")
    assert populated.resolve("t@prod") == ("t", 2)  # nothing moved
