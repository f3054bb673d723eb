"""Per-chunk sha256s: recorded at publish, parsed strictly, checked on a load by two threads
(``registry/hashing.py``'s ``Verifier``, one hashlib call per chunk) and by ``registry verify``;
manifests without them still load."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from registry_helpers import make_adapter

from adapterhub.errors import IntegrityError
from adapterhub.registry import hashing, open_registry
from adapterhub.registry.manifest import FileEntry

WEIGHTS = "adapter_model.safetensors"
CHUNK = hashing.MIN_CHUNK


def _digests(data: bytes, chunk: int) -> list[str]:
    return [hashlib.sha256(data[i:i + chunk]).hexdigest() for i in range(0, len(data), chunk)] or [hashlib.sha256(b"").hexdigest()]


def _manifest_path(store, task="t", version=1):
    return store.root / "tasks" / task / "versions" / f"{version}.json"


def _rewrite_manifest(store, edit) -> None:
    path = _manifest_path(store)
    data = json.loads(path.read_text())
    edit(data["files"][WEIGHTS])
    os.chmod(path, 0o644)
    path.write_text(json.dumps(data))


@pytest.fixture
def store(tmp_path):
    return open_registry(tmp_path / "registry")


# -- what publish records ---------------------------------------------------------------------


def test_publish_records_chunk_digests_for_files_over_one_chunk(store, tmp_path):
    adapter = make_adapter(tmp_path / "a", size=70_000)  # 2.2 MB of weights, a small config
    manifest = store.publish("t", adapter)
    weights, config = manifest.files[WEIGHTS], manifest.files["adapter_config.json"]
    data = (adapter / WEIGHTS).read_bytes()
    assert weights.chunk_size == CHUNK and list(weights.chunks) == _digests(data, CHUNK)
    assert len(weights.chunks) == -(-len(data) // CHUNK) > 1
    assert config.chunks == () and config.chunk_size is None, "a file of one chunk needs only its sha256"
    assert store.get_manifest("t", 1).files == manifest.files, "the chunks round-trip through the manifest file"


@pytest.mark.parametrize("size, chunk", [(0, None), (CHUNK, None), (CHUNK + 1, CHUNK), (CHUNK * 1024, CHUNK),
                                         (CHUNK * 1024 + 1, 2 * CHUNK), (10**9, 1 << 20)])
def test_chunk_size_grows_so_a_file_has_at_most_1024_chunks(size, chunk):
    assert hashing.chunk_size_for(size) == chunk


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 3, 4096 * 3 + 1, 50_000])
def test_file_digests_are_those_of_the_slices_however_the_stream_is_cut(size):
    data = random.Random(size).randbytes(size)
    digests, cuts, at = hashing.FileDigests(4096), random.Random(7), 0
    while at < size:
        step = cuts.choice([1, 100, 4095, 4096, 4097, 20_000])
        digests.update(data[at:at + step])
        at += step
    entry = digests.entry()
    assert entry == FileEntry(hashlib.sha256(data).hexdigest(), size, 4096, tuple(_digests(data, 4096)))


# -- strict parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize("edit, why", [
    (lambda e: e["chunks"].update(size=1000), "chunk size 1000"),
    (lambda e: e["chunks"].update(size=True), "chunk size True"),
    (lambda e: e["chunks"].update(size=1 << 30), "needs 1 chunk digests"),
    (lambda e: e["chunks"]["sha256"].pop(), "needs 9 chunk digests"),
    (lambda e: e["chunks"]["sha256"].__setitem__(2, "../../etc"), "malformed chunk sha256"),
    (lambda e: e["chunks"].update(sha256="abc"), "needs 9 chunk digests"),
    (lambda e: e["chunks"].pop("size"), "KeyError"),
])
def test_malformed_chunk_entries_are_refused_naming_the_file(store, tmp_path, edit, why):
    store.publish("t", make_adapter(tmp_path / "a", size=70_000))
    _rewrite_manifest(store, edit)
    with pytest.raises(IntegrityError, match=why):
        store.manifest("t@1")


def test_a_server_load_checks_the_chunks_on_the_hasher_and_the_loading_thread(store, tmp_path, monkeypatch):
    """The hasher thread starts on the chunks while the read goes on; check() (the loading thread)
    takes whatever is left. Every chunk is hashed once, by one of them."""
    from adapterhub.serve.adapter_source import AdapterSource

    made = []

    class Counted(hashing.ChunksWhileReading):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(hashing, "ChunksWhileReading", Counted)
    store.publish("t", make_adapter(tmp_path / "a", size=70_000))
    source = AdapterSource(store.root)
    files = source.read(source.resolve("t@1"))
    files.check()
    assert len(made) == 1, "the weights file, and only it, is checked by chunks"
    assert made[0]._verifier.wait() == [] and made[0]._verifier.run() == 0, "nothing left after check()"


def test_a_manifest_without_chunks_still_loads_and_checks_the_whole_sha256(store, tmp_path):
    """Versions published before chunks existed are read with one sha256 on the hasher thread."""
    store.publish("t", make_adapter(tmp_path / "a", size=70_000))
    _rewrite_manifest(store, lambda e: e.pop("chunks"))
    assert store.manifest("t@1").files[WEIGHTS].chunks == ()
    with ThreadPoolExecutor(1) as hasher:
        read = store.read_version("t@1", hasher=hasher)
        read.check()
        assert bytes(read.data[WEIGHTS]) == (tmp_path / "a" / WEIGHTS).read_bytes()
    assert store.verify() == []


def test_chunk_digests_that_do_not_match_their_blob_fail_the_load_and_verify(store, tmp_path):
    """A manifest whose chunks disagree with a blob whose sha256 agrees: every load fails naming
    the file, and verify says so (it checks both)."""
    store.publish("t", make_adapter(tmp_path / "a", size=70_000))
    _rewrite_manifest(store, lambda e: e["chunks"]["sha256"].__setitem__(3, "0" * 64))
    with ThreadPoolExecutor(1) as hasher:
        read = store.read_version("t@1", hasher=hasher)
        with pytest.raises(IntegrityError, match=f"{WEIGHTS}.*sha256"):
            read.check()
    problems = store.verify()
    assert [p.message for p in problems if "chunk digests" in p.message], problems


# -- the verifier ------------------------------------------------------------------------------


def _verifier(data: bytearray, chunk: int = 4096, expected: list[str] | None = None):
    return hashing.Verifier(data, chunk, b"".join(bytes.fromhex(d) for d in expected or _digests(bytes(data), chunk)))


@pytest.mark.parametrize("where", [0, 4095, 4096, 3 * 4096 + 17, -1])
def test_verifier_names_the_chunk_with_a_flipped_bit(where):
    data = bytearray(random.Random(1).randbytes(5 * 4096 + 100))
    expected = _digests(bytes(data), 4096)
    data[where] ^= 0x10
    verifier = _verifier(data, expected=expected)
    verifier.advanced(len(data))
    verifier.read_over()
    assert verifier.run() == 6
    assert verifier.wait() == [(where % len(data)) // 4096]


def test_verifier_reports_chunks_the_read_never_brought_as_failed():
    data = bytearray(random.Random(2).randbytes(4 * 4096))
    verifier = _verifier(data)
    verifier.advanced(2 * 4096 + 5)  # a short read: chunk 2 is half in, chunk 3 not at all
    verifier.read_over()
    assert verifier.run() == 2, "unread chunks are not hashed"
    assert verifier.wait() == [2, 3]


def test_verifier_threads_share_the_chunks_and_follow_the_read():
    """Three threads take chunks while a reader brings the bytes in, slice by slice; each chunk is
    hashed once, only after it is all in, and all match."""
    size = 64 * 4096 + 9
    data = bytearray(size)
    source = random.Random(3).randbytes(size)
    verifier = hashing.Verifier(data, 4096, b"".join(bytes.fromhex(d) for d in _digests(source, 4096)))
    counts = []
    threads = [threading.Thread(target=lambda: counts.append(verifier.run())) for _ in range(3)]
    for thread in threads:
        thread.start()
    at, cuts = 0, random.Random(4)
    while at < size:
        step = min(size - at, cuts.randint(1, 30_000))
        data[at:at + step] = source[at:at + step]
        at += step
        verifier.advanced(at)
    verifier.read_over()
    for thread in threads:
        thread.join(timeout=30)
    assert verifier.wait() == [] and sum(counts) == 65


def test_verifier_refuses_digests_that_do_not_fit_the_buffer():
    with pytest.raises(ValueError, match="need 3 digests"):
        hashing.Verifier(bytearray(3 * 4096), 4096, bytes(64))
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        hashing.Verifier(bytearray(10), 0, b"")
    with pytest.raises(ValueError, match="outside the buffer"):
        _verifier(bytearray(10)).advanced(11)


def test_a_verifier_keeps_its_buffer_from_being_resized():
    data = bytearray(8192)
    verifier = _verifier(data)
    with pytest.raises(BufferError):
        data.extend(b"more")  # hashlib reads it without the GIL: it must not move
    del verifier
    data.extend(b"more")
