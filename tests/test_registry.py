"""Registry store: references, publishing, tags, removal, integrity, export/import, remote staging."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from registry_helpers import FINGERPRINT, OTHER_FINGERPRINT, make_adapter

from adapterhub.errors import (
    AdapterHubError,
    BaseMismatch,
    ConfigError,
    IntegrityError,
    InvalidReference,
    LimitExceeded,
    NotFound,
)
from adapterhub.registry import (
    FileStore,
    Manifest,
    Reference,
    check_base,
    export_dir,
    import_dir,
    open_registry,
    parse_reference,
    registry_path,
    validate_tag,
    validate_task,
)
from adapterhub.registry import remote


@pytest.fixture
def store(tmp_path) -> FileStore:
    return open_registry(tmp_path / "registry", cache_dir=tmp_path / "cache")


@pytest.fixture
def adapter(tmp_path) -> Path:
    return make_adapter(tmp_path / "adapter", seed=1)


def _corrupt(path: Path) -> None:
    os.chmod(path, 0o644)  # blobs are stored read-only; disks rot anyway
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# -- references and names --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sentiment", Reference("sentiment")),
        ("sentiment@3", Reference("sentiment", version=3)),
        ("sentiment@prod", Reference("sentiment", tag="prod")),
        ("sentiment@latest", Reference("sentiment", tag="latest")),
        ("a.b_c-d@v1.2", Reference("a.b_c-d", tag="v1.2")),
    ],
)
def test_parse_reference_accepts_the_three_forms(text, expected):
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("a@", "nothing after '@'"),
        ("a@-1", "numbered from 1"),
        ("a@0", "numbered from 1"),
        ("a@+2", "without a sign"),
        ("a@b@c", "more than one '@'"),
        ("../x", "'../x' is not allowed"),
        ("a/b", "is not allowed"),
        (".hidden", "is not allowed"),
        ("a..b", "is not allowed"),
        ("x" * 10_000, "too long (10000"),
        ("a@" + "t" * 101, "too long"),
        ("@3", "task name is empty"),
        ("a@x/y", "not allowed"),
    ],
)
def test_parse_reference_rejects_malformed_with_a_clear_message(text, fragment):
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert fragment in str(info.value)
    assert len(str(info.value)) < 400  # a 10 kB name is shortened in the message


def test_reference_latest_and_explicit_flags():
    assert parse_reference("t").is_latest and not parse_reference("t").explicit
    assert parse_reference("t@latest").is_latest and parse_reference("t@latest").explicit
    assert not parse_reference("t@2").is_latest


@pytest.mark.parametrize("tag, fragment", [("123", "purely numeric"), ("latest", "reserved"), ("-x", "not allowed"), ("", "empty")])
def test_bad_tags_are_refused(tag, fragment):
    with pytest.raises(InvalidReference, match=fragment):
        validate_tag(tag)


def test_task_name_rule_is_named_in_the_error():
    with pytest.raises(InvalidReference) as info:
        validate_task("bad name")
    assert "'bad name'" in str(info.value) and "A-Z a-z 0-9" in str(info.value)
    assert validate_task("ok-name_1.2") == "ok-name_1.2"


def test_registry_location_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "env"))
    assert registry_path(tmp_path / "arg") == tmp_path / "arg"
    assert registry_path() == tmp_path / "env"
    assert open_registry().root == (tmp_path / "env").absolute()
    monkeypatch.delenv("ADAPTERHUB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry_path() == tmp_path / "home" / ".adapterhub"


# -- publishing and reading ------------------------------------------------------------------


def test_publish_records_a_complete_manifest(store, adapter):
    manifest = store.publish("sentiment", adapter, extra={"run": "r1"})
    assert manifest.ref == "sentiment@1"
    assert manifest.method == "lora" and manifest.method_config == {"r": 4, "lora_alpha": 8}
    assert manifest.base_fingerprint == FINGERPRINT and manifest.base_name == "tiny"
    assert manifest.training["seed"] == 1 and manifest.metrics == {"loss": 0.5}
    assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}
    for name, entry in manifest.files.items():
        assert entry.size == (adapter / name).stat().st_size
        assert (store.root / "blobs" / entry.sha256).is_file()
    assert set(manifest.software) >= {"adapterhub", "peft", "transformers"}
    assert manifest.software["adapterhub"] != "unknown"
    assert manifest.created.endswith("Z") and manifest.extra == {"run": "r1"}
    on_disk = json.loads((store.root / "tasks/sentiment/versions/1.json").read_text())
    assert Manifest.from_dict(on_disk) == manifest == store.manifest("sentiment@1")


def test_versions_count_from_one_and_latest_is_the_highest(store, tmp_path):
    for seed in range(3):
        store.publish("t", make_adapter(tmp_path / f"a{seed}", seed=seed))
    assert store.list_versions("t") == [1, 2, 3]
    assert store.resolve("t") == ("t", 3) == store.resolve("t@latest")
    assert store.list_tasks() == ["t"]
    assert store.list_versions("unknown") == []


def test_identical_files_share_one_blob(store, adapter):
    a = store.publish("t", adapter)
    b = store.publish("u", adapter)
    assert a.files == b.files
    assert len(list((store.root / "blobs").iterdir())) == 2


def test_version_numbers_are_never_reused_after_rm(store, tmp_path):
    store.publish("t", make_adapter(tmp_path / "a", seed=1))
    store.publish("t", make_adapter(tmp_path / "b", seed=2))
    store.remove_version("t@2")
    assert store.publish("t", make_adapter(tmp_path / "c", seed=3)).version == 3


def test_parent_is_recorded_pinned(store, tmp_path):
    store.publish("t", make_adapter(tmp_path / "a", seed=1))
    store.set_tag("t@1", "prod")
    child = store.publish("t", make_adapter(tmp_path / "b", seed=2), parent="t@prod")
    assert child.parent == "t@1"
    with pytest.raises(NotFound, match="t@9"):
        store.publish("t", make_adapter(tmp_path / "c", seed=3), parent="t@9")
    # a pinned parent from another registry (adapterhub.json of an import) is kept as given
    imported = store.publish("t", make_adapter(tmp_path / "d", seed=4, parent="elsewhere@4"))
    assert imported.parent == "elsewhere@4"


def test_resolve_errors_name_what_exists(store, adapter):
    with pytest.raises(NotFound, match="registry is empty"):
        store.resolve("nope")
    store.publish("t", adapter)
    with pytest.raises(NotFound, match=r"t@7 does not exist; known versions: 1"):
        store.resolve("t@7")
    with pytest.raises(NotFound, match="no tag 'prod'"):
        store.resolve("t@prod")
    with pytest.raises(NotFound, match="known tasks: t"):
        store.resolve("other")


def test_metadata_is_required_and_validated(store, tmp_path):
    plain = make_adapter(tmp_path / "plain", metadata=False)
    with pytest.raises(ConfigError, match="no adapterhub.json"):
        store.publish("t", plain)
    (plain / "adapterhub.json").write_text(json.dumps({"method": "lora", "base": {}}))
    with pytest.raises(ConfigError, match="fingerprint"):
        store.publish("t", plain)
    assert store.list_versions("t") == []


def test_the_host_and_the_registry_share_one_metadata_schema(store, tmp_path):
    """``adapterhub.json`` is defined once (adapterhub.metadata): what the host writes the registry
    publishes, and its export reads back on the host as the same fields; the base check is one too."""
    import adapterhub.registry
    from adapterhub import metadata
    from adapterhub.adapters import adapter_metadata

    assert adapterhub.registry.Metadata is metadata.Metadata and check_base is metadata.check_base
    written = metadata.Metadata(method="lora", base_fingerprint=FINGERPRINT, base_name="tiny",
                                method_config={"r": 4}, training={"lr": 0.001}, metrics={"loss": 0.5})
    directory = make_adapter(tmp_path / "a", metadata=False)
    metadata.write_metadata(directory, written)
    manifest = store.publish("t", directory)
    assert manifest.metadata() == written == adapter_metadata(export_dir(store, manifest, tmp_path / "out"))
    with pytest.raises(BaseMismatch, match=f"trained on base tiny \\({FINGERPRINT}\\), not on other "
                                           f"\\({OTHER_FINGERPRINT}\\).*allow-base-mismatch"):
        check_base(adapter_metadata(directory), OTHER_FINGERPRINT, base_name="other")


def test_a_directory_parent_loads_on_the_host_but_is_not_published(store, tmp_path):
    """A child continued from a directory (``--from DIR``) records that directory as its parent:
    the host reads it, the registry refuses it (it records references only) before storing a byte."""
    from adapterhub import metadata
    from adapterhub.adapters import adapter_metadata

    child = make_adapter(tmp_path / "child", parent=str(tmp_path / "parent"))
    assert adapter_metadata(child).parent == str(tmp_path / "parent")
    with pytest.raises(InvalidReference, match=r"adapterhub.json: parent '.*' is not a registry reference"):
        store.publish("t", child)
    assert not list((store.root / "blobs").glob("*")) and store.list_tasks() == []
    (child / metadata.METADATA_FILE).write_text(json.dumps({"method": "lora", "base": {"fingerprint": FINGERPRINT},
                                                            "parent": 3}))
    with pytest.raises(ConfigError, match="'parent' must be a reference"):
        adapter_metadata(child)


# -- tags and removal ------------------------------------------------------------------------


def test_tags_move_and_untag(store, tmp_path):
    store.publish("t", make_adapter(tmp_path / "a", seed=1))
    store.publish("t", make_adapter(tmp_path / "b", seed=2))
    store.set_tag("t@1", "prod")
    assert store.tags("t") == {"prod": 1}
    store.set_tag("t@2", "prod")
    assert store.tags("t") == {"prod": 2} and store.resolve("t@prod") == ("t", 2)
    assert (store.root / "tasks/t/refs/prod").read_text() == "2\n"
    assert not [p for p in (store.root / "tasks/t/refs").iterdir() if p.name != "prod"]  # no temp left
    assert store.remove_tag("t", "prod") == 2
    assert store.tags("t") == {}
    with pytest.raises(NotFound):
        store.remove_tag("t", "prod")
    with pytest.raises(InvalidReference, match="reserved"):
        store.set_tag("t@1", "latest")


def test_rm_refuses_tagged_version_unless_forced(store, tmp_path):
    store.publish("t", make_adapter(tmp_path / "a", seed=1))
    store.publish("t", make_adapter(tmp_path / "b", seed=2))
    store.set_tag("t@1", "prod")
    with pytest.raises(AdapterHubError, match="tagged prod"):
        store.remove_version("t@1")
    assert store.list_versions("t") == [1, 2]
    store.remove_version("t@1", force=True)
    assert store.list_versions("t") == [2] and store.tags("t") == {}
    assert store.verify() == []


def test_gc_frees_only_unreferenced_blobs(store, tmp_path):
    shared = make_adapter(tmp_path / "a", seed=1)
    store.publish("t", shared)
    m2 = store.publish("t", make_adapter(tmp_path / "b", seed=2))
    store.materialize("t@2")
    store.remove_version("t@2")
    weights = m2.files["adapter_model.safetensors"].sha256
    config = m2.files["adapter_config.json"].sha256  # same config bytes as t@1: still referenced
    stale = store.root / "blobs" / ".blob.nohost-1-abc.incomplete"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))  # older than the stale-after age
    assert store.gc(dry_run=True)["blobs_removed"] == [str(store.root / "blobs" / weights)]
    assert (store.root / "blobs" / weights).exists()
    report = store.gc()
    assert report["blobs_removed"] == [str(store.root / "blobs" / weights)]
    assert report["temp_removed"] == [str(stale)]
    assert not (store.root / "blobs" / weights).exists() and not stale.exists()
    assert (store.root / "blobs" / config).exists()
    assert store.verify() == [] and store.materialize("t@1").is_dir()


def test_gc_removes_snapshots_that_earlier_versions_built_in_the_registry(store, adapter):
    store.publish("t", adapter)
    legacy = store.root / "snapshots" / "t" / "1"
    legacy.mkdir(parents=True)
    (legacy / "adapter_model.safetensors").write_bytes(b"old")
    assert store.gc()["snapshots_removed"] == [str(legacy)]
    assert not legacy.exists() and store.materialize("t@1").is_dir()


def test_gc_keeps_temp_files_of_live_writers(store, adapter):
    store.publish("t", adapter)
    from adapterhub.registry import fsutil

    live = fsutil.temp_path(store.root / "blobs" / "blob")  # named with this (live) process's pid
    live.write_bytes(b"in progress")
    assert store.gc()["temp_removed"] == [] and live.exists()


# -- materialize and integrity ---------------------------------------------------------------


def test_materialize_builds_a_verified_snapshot_in_the_read_cache(store, adapter):
    manifest = store.publish("t", adapter)
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    snapshot = store.materialize("t")
    assert snapshot == store.cache.entry_path(manifest) and snapshot.is_relative_to(store.cache.root)
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before, "reading wrote to the registry"
    for name in manifest.files:
        assert (snapshot / name).read_bytes() == (adapter / name).read_bytes()
    assert store.materialize(manifest) == snapshot  # second call reuses and re-verifies
    # self-describing, like an export: a loader reads method and base from the directory
    described = json.loads((snapshot / "adapterhub.json").read_text())
    assert described == json.loads((adapter / "adapterhub.json").read_text())
    assert Manifest.from_dict(json.loads((snapshot / "manifest.json").read_text())) == manifest
    weights = snapshot / "adapter_model.safetensors"
    blob = store.root / "blobs" / manifest.files["adapter_model.safetensors"].sha256
    assert not os.path.samefile(weights, blob), "a copy: editing the cache cannot touch the registry"
    assert not os.stat(weights).st_mode & 0o222, "cached files are read-only"


def test_corrupted_blob_is_refused_on_load_naming_the_file(store, adapter):
    manifest = store.publish("t", adapter)
    blob = store.root / "blobs" / manifest.files["adapter_model.safetensors"].sha256
    _corrupt(blob)
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        store.materialize("t@1")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        store.read_bytes("t@1", "adapter_model.safetensors")
    assert store.open("t@1", "adapter_config.json").read() == (adapter / "adapter_config.json").read_bytes()
    problems = store.verify()
    assert any("adapter_model.safetensors" in p.path for p in problems)


def test_a_damaged_cache_copy_is_fetched_again_from_the_registry(store, adapter, caplog):
    manifest = store.publish("t", adapter)
    snapshot = store.materialize("t@1")
    _corrupt(snapshot / "adapter_model.safetensors")
    # same size, so a size-only check cannot see it; documented trade-off
    assert store.materialize("t@1", verify="size") == snapshot
    with caplog.at_level(logging.WARNING, logger="adapterhub.registry.readcache"):
        assert store.materialize("t@1") == snapshot  # the default re-hash sees it and fetches again
    assert "damaged" in caplog.text
    assert (snapshot / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    described = snapshot / "adapterhub.json"
    os.chmod(described, 0o644)
    described.write_text(described.read_text().replace('"lora"', '"ia3"'))
    assert json.loads((store.materialize("t@1") / "adapterhub.json").read_text())["method"] == "lora"
    assert store.verify() == [] and manifest.files  # the registry itself was never damaged


def test_a_damaged_cache_copy_fails_the_load_that_read_it_and_is_dropped(store, adapter):
    manifest = store.publish("t", adapter)
    snapshot = store.materialize("t@1")
    _corrupt(snapshot / "adapter_model.safetensors")
    read = store.read_version("t@1")
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors.*read cache"):
        read.check()
    assert not snapshot.exists(), "the next load fetches it again"
    again = store.read_version("t@1")
    again.check()
    assert bytes(again.data["adapter_model.safetensors"]) == (adapter / "adapter_model.safetensors").read_bytes()
    assert manifest.ref == "t@1"


def test_missing_blob_is_an_integrity_error_naming_it(store, adapter):
    manifest = store.publish("t", adapter)
    blob = store.root / "blobs" / manifest.files["adapter_config.json"].sha256
    blob.unlink()
    with pytest.raises(IntegrityError, match=f"missing blob .*{blob.name}"):
        store.materialize("t@1")
    assert [p.message for p in store.verify()] == [f"missing blob {blob}"]


@pytest.mark.parametrize("bad_name", ["../escape", "/etc/passwd", "a/b", "..", ".hidden"])
def test_manifest_with_escaping_file_name_is_refused(store, adapter, bad_name):
    store.publish("t", adapter)
    path = store.root / "tasks/t/versions/1.json"
    data = json.loads(path.read_text())
    data["files"][bad_name] = data["files"].pop("adapter_config.json")
    os.chmod(path, 0o644)
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="is not allowed|is empty"):
        store.materialize("t@1")
    assert not list((store.root).glob("**/passwd")) and not (store.root.parent / "escape").exists()
    assert store.verify()


def test_manifest_moved_to_another_version_is_refused(store, tmp_path):
    store.publish("t", make_adapter(tmp_path / "a", seed=1))
    store.publish("t", make_adapter(tmp_path / "b", seed=2))
    versions = store.root / "tasks/t/versions"
    (versions / "2.json").write_bytes((versions / "1.json").read_bytes())
    with pytest.raises(IntegrityError, match="describes t@1, not t@2"):
        store.manifest("t@2")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".BIN"])
def test_pickle_files_are_refused_and_nothing_is_written(store, adapter, suffix):
    (adapter / f"adapter_model{suffix}").write_bytes(b"\x80\x04not really")
    with pytest.raises(IntegrityError, match="pickle"):
        store.publish("t", adapter)
    assert store.list_versions("t") == [] and not (store.root / "blobs").exists()


def test_disguised_safetensors_is_refused(store, adapter):
    (adapter / "extra.safetensors").write_bytes(b"\x80\x04\x95 pickle bytes")
    with pytest.raises(IntegrityError, match="not a valid safetensors"):
        store.publish("t", adapter)


def test_max_file_bytes_refuses_big_files(tmp_path, adapter):
    small = open_registry(tmp_path / "r", max_file_bytes=1000)
    with pytest.raises(LimitExceeded, match="max_file_bytes=1000"):
        small.publish("t", adapter)
    assert small.list_versions("t") == []
    assert open_registry(tmp_path / "r", max_file_bytes=10_000).publish("t", adapter).version == 1


def test_unsafe_names_in_the_adapter_dir_are_refused(store, adapter):
    (adapter / "sub").mkdir()
    with pytest.raises(ConfigError, match="subdirectories"):
        store.publish("t", adapter)
    (adapter / "sub").rmdir()
    (adapter / "bad name.json").write_text("{}")
    with pytest.raises(InvalidReference, match="bad name.json"):
        store.publish("t", adapter)


def test_check_base(store, adapter, caplog):
    manifest = store.publish("t", adapter)
    assert check_base(manifest, FINGERPRINT) is True
    with pytest.raises(BaseMismatch) as info:
        check_base(manifest, OTHER_FINGERPRINT, base_name="other-base")
    message = str(info.value)
    assert FINGERPRINT in message and OTHER_FINGERPRINT in message and "tiny" in message and "other-base" in message
    with caplog.at_level(logging.WARNING, logger="adapterhub.metadata"):
        assert check_base(manifest, OTHER_FINGERPRINT, allow_mismatch=True) is False
    assert OTHER_FINGERPRINT in caplog.text


# -- export / import / remote ----------------------------------------------------------------


def test_export_then_import_round_trips(store, tmp_path, adapter):
    store.publish("t", make_adapter(tmp_path / "p", seed=9))
    original = store.publish("t", adapter, parent="t@1")
    out = export_dir(store, "t@2", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "manifest.json"]
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["version"] == 2
    other = open_registry(tmp_path / "other")
    again = import_dir(other, "copy", out)
    assert again.ref == "copy@1" and again.files == original.files
    assert (again.method, again.metrics, again.parent) == ("lora", original.metrics, "t@1")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export_dir(store, "t@2", out)


def test_import_plain_peft_dir_infers_method(store, tmp_path):
    plain = make_adapter(tmp_path / "plain", metadata=False)
    with pytest.raises(ConfigError, match="--base"):
        import_dir(store, "t", plain)
    manifest = import_dir(store, "t", plain, base_fingerprint=FINGERPRINT)
    assert manifest.method == "lora" and manifest.method_config["peft_type"] == "LORA"
    assert manifest.base_name == "tiny"
    assert not (plain / "adapterhub.json").exists()  # the user's directory is left alone
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert import_dir(store, "t", plain, base_fingerprint=FINGERPRINT).method == "dora"
    assert import_dir(store, "t", plain, base_fingerprint=FINGERPRINT, method="qlora").method == "qlora"
    for peft_type, method in [("IA3", "ia3"), ("PREFIX_TUNING", "prefix"), ("P_TUNING", "ptuning")]:
        (plain / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
        assert import_dir(store, "t", plain, base_fingerprint=FINGERPRINT).method == method
    (plain / "adapter_config.json").write_text(json.dumps({"peft_type": "MYSTERY"}))
    with pytest.raises(ConfigError, match="--method"):
        import_dir(store, "t", plain, base_fingerprint=FINGERPRINT)


def test_import_computes_base_fingerprint_from_base_dir(store, tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    from adapterhub.base import fingerprint

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(base / "model.safetensors"))
    manifest = import_dir(store, "t", make_adapter(tmp_path / "plain", metadata=False), base=base)
    assert manifest.base_fingerprint == fingerprint(base) and manifest.base_fingerprint.startswith("sha256:")


def test_push_uploads_the_export_through_the_hub_api(store, adapter):
    """Offline: a stand-in for HfApi records the calls; the real Hub is not contacted."""
    store.publish("t", adapter)

    class RecordingApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, **kwargs):
            self.calls.append(("create_repo", kwargs))

        def upload_folder(self, *, folder_path, **kwargs):
            self.calls.append(("upload_folder", sorted(os.listdir(folder_path)), kwargs))
            return "commit-url"

    api = RecordingApi()
    result = remote.push(store, "t", "user/t-lora", api=api)
    expected = ["adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "manifest.json"]
    assert result["files"] == expected and result["ref"] == "t@1"
    assert api.calls[0] == ("create_repo", {"repo_id": "user/t-lora", "private": False, "exist_ok": True})
    assert api.calls[1][1] == expected and api.calls[1][2]["repo_id"] == "user/t-lora"


def test_pull_imports_a_downloaded_snapshot(store, tmp_path, adapter):
    """Offline: the download is a stand-in returning a local dir shaped like a Hub snapshot."""
    store.publish("t", adapter)
    hub_repo = export_dir(store, "t@1", tmp_path / "hub_repo")
    (hub_repo / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (hub_repo / "README.md").write_text("# adapter\n")
    seen = {}

    def fake_download(**kwargs):
        seen.update(kwargs)
        return str(hub_repo)

    pulled = remote.pull(store, "user/t-lora", "pulled", download=fake_download)
    assert seen["repo_id"] == "user/t-lora" and "*.bin" in seen["ignore_patterns"]
    assert pulled.ref == "pulled@1" and set(pulled.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    # a local directory path is imported directly
    assert remote.pull(store, str(hub_repo), "pulled").version == 2


# -- concurrency inside one process, and property tests ------------------------------------------


def test_concurrent_materialize_builds_one_snapshot(store, adapter):
    import threading

    store.publish("t", adapter)
    results, errors = [], []
    barrier = threading.Barrier(8)

    def load():
        try:
            barrier.wait()
            results.append(open_registry(store.root, cache_dir=store.cache.root).materialize("t@1"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and set(results) == {store.cache.entry_path(store.manifest("t@1"))}
    assert os.listdir(store.cache.root / "versions") == [results[0].name]  # losers cleaned up their temp dirs


def test_threads_publishing_concurrently_get_distinct_versions(store, tmp_path):
    import threading

    versions, errors = [], []

    def publish_five(writer):
        own = open_registry(store.root)  # separate store objects, like separate server workers
        for i in range(5):
            try:
                versions.append(own.publish("t", make_adapter(tmp_path / f"w{writer}-{i}", seed=writer * 10 + i)).version)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=publish_five, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(versions) == list(range(1, 21)) == store.list_versions("t")


def test_publish_survives_gc_removing_its_fresh_blobs(store, adapter):
    """gc runs between a publisher's blob copy and its commit: the publisher re-stores the blobs."""
    import contextlib

    class GcRacingStore(FileStore):
        raced = False

        @contextlib.contextmanager
        def _locked(self):
            if not self.raced:
                self.raced = True
                self.removed = self.gc()["blobs_removed"]  # the fresh blobs are unreferenced now
            with super()._locked():
                yield

    racing = GcRacingStore(store.root)
    manifest = racing.publish("t", adapter)
    assert len(racing.removed) == 2
    assert store.verify() == [] and store.materialize(manifest).is_dir()


def test_damaged_tag_file_is_reported(store, adapter):
    store.publish("t", adapter)
    (store.root / "tasks/t/refs").mkdir()
    (store.root / "tasks/t/refs/prod").write_text("garbage")
    with pytest.raises(IntegrityError, match="prod"):
        store.tags("t")
    (store.root / "tasks/t/refs/prod").write_text("5\n")
    assert [p.message for p in store.verify()] == ["tag 'prod' points at missing version t@5"]


from hypothesis import given, settings, strategies as st  # noqa: E402

_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(lambda s: ".." not in s)


_tag = _name.filter(lambda s: not s.isdigit() and s != "latest")


@settings(max_examples=150, deadline=None)
@given(task=_name, selector=st.one_of(st.none(), st.integers(1, 10**6), _tag))
def test_valid_references_round_trip(task, selector):
    text = task if selector is None else f"{task}@{selector}"
    ref = parse_reference(text)
    assert str(ref) == text and ref.task == task
    assert ref.version == (selector if isinstance(selector, int) else None)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_raises_invalid_reference(text):
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    assert "/" not in ref.task and "\\" not in ref.task and not ref.task.startswith(".") and ".." not in ref.task
    assert str(ref) == text or text.split("@")[1].lstrip("0") == str(ref.version)


def test_parsed_manifests_are_reused_only_while_their_file_is_unchanged(store, tmp_path):
    """A server resolves a reference per request; the registry reuses the parsed manifest while
    its file's stat is the same, and sees a removed or replaced one at once. verify reads afresh."""
    store.publish("t", make_adapter(tmp_path / "a", seed=1))
    first = store.manifest("t@1")
    assert store.manifest("t@1") is first, "an unchanged file is not parsed again"
    path = store.root / "tasks/t/versions/1.json"
    data = json.loads(path.read_text())
    data["metrics"] = {"accuracy": 0.5}
    replacement = path.with_name("new.json.tmp")
    replacement.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(replacement, path)  # how a manifest file could change at all: a new file
    assert store.manifest("t@1").metrics == {"accuracy": 0.5}
    stat = path.stat()
    data["files"]["adapter_config.json"]["sha256"] = "0" * 64  # an in-place edit that keeps the stat
    os.chmod(path, 0o644)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")  # same size, same inode
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_ino) == (stat.st_size, stat.st_ino)
    assert store.manifest("t@1").files["adapter_config.json"].sha256 != "0" * 64, "the stat says unchanged"
    assert any("adapter_config.json" in str(p) for p in store.verify()), "verify reads the file afresh"
    store.remove_version("t@1", force=True)
    with pytest.raises(NotFound, match="t@1"):
        store.manifest("t@1")
