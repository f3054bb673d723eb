"""One set of registry semantics on every backend: a directory (FileStore), file://, memory:// and
S3 (a real moto server on 127.0.0.1). Races run in test_registry_races.py (local backends only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from objectstore_helpers import BACKENDS, backend_url, corrupt_blob, delete_blob, s3_env, s3_server  # noqa: F401
from registry_helpers import FINGERPRINT, make_adapter

from adapterhub.errors import AdapterHubError, ConfigError, IntegrityError, NotFound
from adapterhub.registry import FileStore, Manifest, open_registry


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    url = backend_url(request.param, tmp_path, request)
    return open_registry(url, cache_dir=tmp_path / "cache")


def _publish(store, tmp_path, task="t", seed=0, **kwargs) -> Manifest:
    return store.publish(task, make_adapter(tmp_path / f"src-{task}-{seed}", seed=seed), **kwargs)


def test_the_url_picks_the_backend(tmp_path):
    assert isinstance(open_registry(tmp_path / "r"), FileStore)
    for url in [(tmp_path / "r").as_uri(), "memory://x", "s3://bucket/prefix", "gs://bucket/prefix",
                "az://container/prefix"]:
        store = open_registry(url)
        assert type(store).__name__ == "ObjectStore" and store.location == url
    store = open_registry("s3://bucket/prefix", options={"region": "eu-west-1", "endpoint": "http://127.0.0.1:9"})
    store.bucket._open(write=False)  # obstore accepts the URL and the options
    with pytest.raises(ConfigError, match="ftp"):
        open_registry("ftp://host/x")
    with pytest.raises(ConfigError, match="--registry-option applies to registry URLs"):
        open_registry(tmp_path / "r", options={"region": "x"})
    with pytest.raises(ConfigError, match="not_a_key"):
        open_registry("s3://bucket/p", options={"not_a_key": "1"}).list_tasks()


def test_publish_and_resolve(store, tmp_path):
    assert store.list_tasks() == [] and store.list_versions("t") == []
    m1 = _publish(store, tmp_path, seed=1, extra={"run": 1})
    m2 = _publish(store, tmp_path, seed=2, parent="t@1")
    assert (m1.ref, m2.ref) == ("t@1", "t@2") and m2.parent == "t@1"
    assert store.list_tasks() == ["t"] and store.list_versions("t") == [1, 2]
    assert store.resolve("t") == ("t", 2) and store.resolve("t@latest") == ("t", 2) and store.resolve("t@1") == ("t", 1)
    got = store.manifest("t@1")
    assert got == m1 and got.extra == {"run": 1} and got.base_fingerprint == FINGERPRINT
    with pytest.raises(NotFound, match="known versions: 1-2"):
        store.resolve("t@3")
    with pytest.raises(NotFound, match="known tasks: t"):
        store.resolve("other")
    directory = store.materialize("t@2")
    for name in m2.files:
        assert (directory / name).read_bytes() == (tmp_path / "src-t-2" / name).read_bytes()
    assert store.read_bytes("t@1", "adapter_config.json") == (tmp_path / "src-t-1" / "adapter_config.json").read_bytes()
    read = store.read_version("t@1")
    read.check()
    assert bytes(read.data["adapter_model.safetensors"]) == (tmp_path / "src-t-1" / "adapter_model.safetensors").read_bytes()
    assert store.verify() == []


def test_tags_move_untag_and_refuse_missing_versions(store, tmp_path):
    _publish(store, tmp_path, seed=1)
    _publish(store, tmp_path, seed=2)
    assert store.set_tag("t@1", "prod").ref == "t@1"
    assert store.tags("t") == {"prod": 1} and store.resolve("t@prod") == ("t", 1)
    store.set_tag("t@2", "prod")
    store.set_tag("t@prod", "canary")  # a tag names a version too
    assert store.tags("t") == {"canary": 2, "prod": 2} and store.manifest("t@prod").version == 2
    with pytest.raises(NotFound):
        store.set_tag("t@9", "prod")
    assert store.remove_tag("t", "prod") == 2
    assert store.tags("t") == {"canary": 2}
    with pytest.raises(NotFound, match="no tag 'prod'"):
        store.remove_tag("t", "prod")
    with pytest.raises(NotFound, match="no tag 'prod'"):
        store.resolve("t@prod")
    store.set_tag("t@1", "prod")  # a removed tag can be set again
    assert store.tags("t") == {"canary": 2, "prod": 1} and store.verify() == []


def test_rm_never_frees_a_number_and_refuses_tagged_versions(store, tmp_path):
    for seed in (1, 2, 3):
        _publish(store, tmp_path, seed=seed)
    store.set_tag("t@3", "prod")
    with pytest.raises(AdapterHubError, match="tagged prod"):
        store.remove_version("t@3")
    assert store.remove_version("t@3", force=True).ref == "t@3"
    assert store.tags("t") == {} and store.list_versions("t") == [1, 2]
    with pytest.raises(NotFound):
        store.manifest("t@3")
    assert _publish(store, tmp_path, seed=4).ref == "t@4", "the number of a removed version came back"
    store.remove_version("t@1")
    assert store.list_versions("t") == [2, 4] and store.resolve("t") == ("t", 4)
    store.remove_version("t@2")
    store.remove_version("t@4")
    assert store.list_tasks() == [] and store.list_versions("t") == []
    assert _publish(store, tmp_path, seed=5).ref == "t@5"
    assert store.verify() == []


def test_gc_frees_only_what_no_version_references(store, tmp_path):
    m1 = _publish(store, tmp_path, seed=1)
    m2 = _publish(store, tmp_path, seed=2)
    assert store.gc()["blobs_removed"] == []
    store.remove_version("t@2")
    weights = m2.files["adapter_model.safetensors"].sha256
    config = m2.files["adapter_config.json"].sha256  # the same bytes as t@1's: still referenced
    assert config == m1.files["adapter_config.json"].sha256
    dry = store.gc(dry_run=True)
    assert [p.rsplit("/", 1)[-1] for p in dry["blobs_removed"]] == [weights]
    report = store.gc()
    assert [p.rsplit("/", 1)[-1] for p in report["blobs_removed"]] == [weights]
    assert report["bytes_freed"] == m2.files["adapter_model.safetensors"].size
    assert store.gc()["blobs_removed"] == [] and store.verify() == []
    assert store.materialize("t@1").is_dir()
    again = _publish(store, tmp_path, seed=2)  # the same bytes: the blob comes back
    assert again.ref == "t@3" and store.verify() == []


def test_corruption_is_detected_naming_the_file(store, tmp_path):
    m = _publish(store, tmp_path, seed=1)
    weights = m.files["adapter_model.safetensors"].sha256
    corrupt_blob(store, weights)
    with pytest.raises(IntegrityError, match=rf"t@1: file 'adapter_model.safetensors' \(.*{weights}\)"):
        store.materialize("t@1")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        store.read_version("t@1")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        store.read_bytes("t@1", "adapter_model.safetensors")
    problems = store.verify()
    assert any("adapter_model.safetensors" in p.path for p in problems)
    assert any(weights in p.path for p in problems), problems  # the blob itself, by its name
    assert not list(store.cache.root.glob("versions/*")), "a failed check left an entry in the cache"


def test_a_missing_blob_is_named(store, tmp_path):
    m = _publish(store, tmp_path, seed=1)
    sha = m.files["adapter_config.json"].sha256
    delete_blob(store, sha)
    with pytest.raises(IntegrityError, match=f"missing blob .*{sha}"):
        store.materialize("t@1")
    assert [p.message for p in store.verify()] == [f"missing blob {store.blob_location(sha)}"]


def test_a_damaged_manifest_and_tag_are_reported(store, tmp_path):
    _publish(store, tmp_path, seed=1)
    store.set_tag("t@1", "prod")
    if isinstance(store, FileStore):
        (store.root / "tasks/t/versions/1.json").write_text("{not json")
        (store.root / "tasks/t/refs/prod").write_text("banana")
    else:
        store.bucket.put("tasks/t/versions/1.json", b"{not json")
        store.bucket.put("tasks/t/refs/prod", b"banana")
        store._manifests.clear()
    messages = " | ".join(str(p) for p in store.verify())
    assert "not valid JSON" in messages and "banana" in messages
    with pytest.raises(IntegrityError, match="not valid JSON"):
        store.get_manifest("t", 1)


def test_reading_every_version_leaves_the_registry_untouched(store, tmp_path):
    for seed in (1, 2):
        _publish(store, tmp_path, seed=seed)
    store.set_tag("t@1", "prod")

    def state():
        if isinstance(store, FileStore):
            return sorted((str(p), p.stat().st_mtime_ns) for p in store.root.rglob("*"))
        return sorted((e.path, e.size, e.modified) for e in store.bucket.list(""))

    before = state()
    reader = open_registry(store.location if not isinstance(store, FileStore) else store.root,
                           cache_dir=tmp_path / "reader-cache")
    if hasattr(store, "bucket") and store.location.startswith("memory://"):
        assert reader.bucket._open(write=False) is store.bucket._open(write=False)  # one store per name
    for ref in ("t@1", "t@2", "t@prod", "t"):
        reader.materialize(ref)
        reader.read_version(ref).check()
    assert reader.verify() == []
    assert state() == before


def test_conditional_writes_are_arbitrated_by_the_store(tmp_path, request):
    """The two primitives every decision rests on, on each backend (S3: moto answers 412)."""
    from adapterhub.registry.objectio import LostRace

    for kind in ("file", "memory", "s3"):
        bucket = open_registry(backend_url(kind, tmp_path / kind, request)).bucket
        assert bucket.create("x/n.json", b"1") is True
        assert bucket.create("x/n.json", b"2") is False, kind
        assert bucket.get("x/n.json").data == b"1"
        bucket.put_if("tag", b"1", None)  # create when absent
        with pytest.raises(LostRace):
            bucket.put_if("tag", b"2", None)
        first = bucket.get("tag").version
        bucket.put_if("tag", b"2", first)
        with pytest.raises(LostRace):
            bucket.put_if("tag", b"3", first)  # stale: someone moved it since
        assert bucket.get("tag").data == b"2", kind


def test_gc_respects_fresh_leases_and_clears_stale_ones(tmp_path, request):
    for kind in ("file", "memory", "s3"):
        store = open_registry(backend_url(kind, tmp_path / kind, request), cache_dir=tmp_path / "cache")
        m = _publish(store, tmp_path / kind, seed=1)
        store.remove_version("t@1")
        weights = m.files["adapter_model.safetensors"].sha256
        store.bucket.put("leases/pending.json", json.dumps({"digests": [weights]}).encode())
        report = store.gc()
        assert weights not in " ".join(report["blobs_removed"]) and report["leases_removed"] == [], kind
        report = store.gc(stale_after=0)  # the lease is now older than the stale age
        assert report["leases_removed"] == [f"{store.location}/leases/pending.json"]
        assert weights in " ".join(report["blobs_removed"]), kind
        assert store.bucket.list("leases/") == []


def test_publish_waits_for_a_running_gc_and_a_dead_gc_is_reported(tmp_path):
    from adapterhub.registry.objectgc import GC_LOCK

    store = open_registry((tmp_path / "reg").as_uri(), cache_dir=tmp_path / "cache")
    store.gc_wait = 0.3
    store.bucket.put(GC_LOCK, json.dumps({"host": "elsewhere", "pid": 7}).encode())
    with pytest.raises(AdapterHubError, match=r"a gc has been running .*host elsewhere, pid 7.*waited 0.3 s"):
        _publish(store, tmp_path, seed=1)
    assert store.bucket.list("leases/") == [] and store.list_versions("t") == []
    with pytest.raises(AdapterHubError, match="another gc is running"):
        store.gc()
    store.lease_ttl = 0.0  # every lock now counts as stale
    with pytest.raises(AdapterHubError, match="gc --break-lock"):
        _publish(store, tmp_path, seed=1)
    with pytest.raises(AdapterHubError, match="never finished.*gc --break-lock"):
        store.gc()
    store.gc(break_lock=True)
    assert store.bucket.get(GC_LOCK) is None
    store.lease_ttl = 3600.0
    assert _publish(store, tmp_path, seed=1).ref == "t@1"


def test_a_publish_slower_than_its_lease_leases_again_and_gives_up_in_the_end(tmp_path):
    """A lease older than half its lifetime may look stale to a gc before the manifest is written:
    the publisher takes a fresh one and checks its blobs again; one that never keeps up fails."""
    store = open_registry((tmp_path / "reg").as_uri(), cache_dir=tmp_path / "cache")
    store.lease_ttl = 1e-9  # every upload is "slow"
    with pytest.raises(AdapterHubError, match="longer than half the lease lifetime"):
        _publish(store, tmp_path, seed=1)
    assert store.list_versions("t") == [] and store.bucket.list("leases/") == []
    store.lease_ttl = 3600.0
    assert _publish(store, tmp_path, seed=1).ref == "t@1" and store.verify() == []


def test_secrets_never_reach_an_error_message(s3_env, tmp_path, capsys):
    """obstore's own messages repeat the endpoint it tried, userinfo and query included: redacted."""
    from adapterhub.cli import main

    secret = "SUPERSECRETVALUE42"
    store = open_registry(f"s3://bucket/p?token={secret}", options={
        "endpoint": f"http://user:{secret}@127.0.0.1:9", "secret_access_key": secret, "timeout": "1s"})
    with pytest.raises(AdapterHubError) as info:  # nothing listens on port 9
        store.list_tasks()
    assert "s3://bucket/p" in str(info.value) and "127.0.0.1:9" in str(info.value)
    assert secret not in str(info.value)
    assert secret not in repr(store) and secret not in repr(store.bucket.location)
    code = main(["registry", "--registry", f"s3://AKIA:{secret}@bucket/p", "--registry-option",
                 f"endpoint=http://127.0.0.1:9/?sig={secret}", "--registry-option", "timeout=1s", "ls"])
    err = capsys.readouterr().err
    assert code != 0 and "s3://bucket/p" in err and secret not in err, err
    assert s3_env.env()["AWS_SECRET_ACCESS_KEY"] not in err


def test_options_instead_of_the_environment(s3_server, tmp_path, monkeypatch):
    """--registry-option endpoint/region/keys reach obstore: no AWS_* variable set at all."""
    for key in ("AWS_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION",
                "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(key, raising=False)
    env = s3_server.env()
    store = open_registry(f"s3://{s3_server.new_bucket()}/x", cache_dir=tmp_path / "cache", options={
        "endpoint": s3_server.endpoint, "region": "us-east-1", "allow_http": "true",
        "access_key_id": env["AWS_ACCESS_KEY_ID"], "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]})
    assert _publish(store, tmp_path, seed=1).ref == "t@1" and store.materialize("t@1").is_dir()


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_every_registry_verb_works_on_a_url(kind, tmp_path, request):
    """import/ls/show/tag/untag/rm/gc/verify/export/materialize as a user runs them, in a subprocess."""
    import subprocess
    import sys

    url = backend_url(kind, tmp_path, request)
    cache = str(tmp_path / "cli-cache")

    def cli(*args, check=0):
        done = subprocess.run([sys.executable, "-m", "adapterhub", "registry", "--registry", url, "--cache-dir", cache,
                               *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == check, (args, done.stdout, done.stderr)
        return done.stdout

    for seed in (1, 2):
        make_adapter(tmp_path / f"a{seed}", seed=seed)
        assert json.loads(cli("import", str(tmp_path / f"a{seed}"), "--task", "t", "--json"))["version"] == seed
    assert json.loads(cli("ls", "--json")) == [{"task": "t", "versions": 2, "latest": 2, "tags": {}}]
    assert json.loads(cli("tag", "t@1", "prod", "--json"))["ref"] == "t@1"
    assert json.loads(cli("show", "t@prod", "--json"))["version"] == 1
    directory = Path(cli("materialize", "t@prod").strip())
    assert directory.is_relative_to(cache) and (directory / "adapter_model.safetensors").is_file()
    cli("export", "t@2", "--out", str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a2" / "adapter_model.safetensors").read_bytes()
    assert "ok" in cli("verify")
    cli("rm", "t@1", check=2)  # tagged
    cli("untag", "t", "prod")
    cli("rm", "t@1")
    report = json.loads(cli("gc", "--json"))
    assert len(report["blobs_removed"]) == 1 and report["leases_removed"] == []
    assert [v["ref"] for v in json.loads(cli("ls", "t", "--json"))] == ["t@2"]
    assert json.loads(cli("import", str(tmp_path / "a1"), "--task", "t", "--json"))["version"] == 3
    assert "ok" in cli("verify")
