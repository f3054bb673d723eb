"""Loading an adapter for serving: each file read once, its hash checked on those same bytes, the form
built from them meanwhile (AdapterFiles, FileStore.read_version, AdapterCache, the LoRA form)."""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from registry_helpers import FINGERPRINT, make_adapter
from safetensors.torch import load_file, save

from adapterhub import AdapterFiles, Method
from adapterhub.errors import IntegrityError, PluginError
from adapterhub.method import Capabilities
from adapterhub.registry import open_registry

WEIGHTS = "adapter_model.safetensors"


def _corrupt(path: Path) -> None:
    os.chmod(path, 0o644)  # blobs are stored read-only; disks rot anyway
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _blob(store, ref: str, name: str = WEIGHTS) -> Path:
    """The copy of a file that the next load reads: the version's entry in the read cache (a load
    that finds it damaged drops it, and the load after that fetches the registry's blob again)."""
    return store.materialize(ref, verify="size") / name


def _lora_dir(directory: Path, config: dict, *, size: int = 48, seed: int = 0) -> Path:
    """A PEFT LoRA directory on two modules; ``config`` is merged into adapter_config.json."""
    make_adapter(directory, seed=seed, size=size)
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, rank in (("q_proj", 4), ("v_proj", 6)):
        tensors[f"base_model.model.layers.0.self_attn.{module}.lora_A.weight"] = torch.from_numpy(
            rng.standard_normal((rank, size), dtype=np.float32))
        tensors[f"base_model.model.layers.0.self_attn.{module}.lora_B.weight"] = torch.from_numpy(
            rng.standard_normal((size + 8, rank), dtype=np.float32))
    (directory / WEIGHTS).write_bytes(save(tensors))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


# -- safetensors through the library ------------------------------------------------------------


def test_read_tensors_uses_the_library_and_returns_owned_copies():
    tensors = {"a": torch.randn(3, 5), "half": torch.randn(4).half(), "flags": torch.tensor([True, False])}
    data = save(tensors)
    parsed = AdapterFiles({WEIGHTS: data}, "/nowhere").read_tensors()
    assert set(parsed) == set(tensors)
    for key, tensor in tensors.items():
        assert parsed[key].dtype == tensor.dtype and torch.equal(parsed[key], tensor), key
    parsed["a"][0, 0] = 123.0  # a copy: the bytes being hashed are never written
    assert AdapterFiles({WEIGHTS: data}, "/nowhere").read_tensors()["a"][0, 0] == tensors["a"][0, 0]


def test_tensor_views_equal_the_library_and_view_the_bytes_read():
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "half": torch.randn(4).half(), "bf": torch.randn(2, 2).bfloat16(),
               "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5), "flags": torch.tensor([True, False]),
               "cube": torch.randn(2, 3, 4).double()}
    files = AdapterFiles({WEIGHTS: bytearray(save(tensors, metadata={"format": "pt"}))}, "/nowhere")
    views = files.tensor_views()
    assert set(views) == set(tensors)
    for key, tensor in tensors.items():
        assert views[key].dtype == tensor.dtype and views[key].shape == tensor.shape and torch.equal(views[key], tensor), key
    assert views["a"].data_ptr() == files.tensor_views()["a"].data_ptr(), "a view of the bytes read, not a copy"
    assert torch.equal(AdapterFiles({WEIGHTS: save(tensors)}, "/nowhere").tensor_views()["cube"], tensors["cube"]), \
        "read-only bytes are taken too (copied once into a writable buffer)"


@pytest.mark.parametrize("damage, why", [
    (lambda d: d[:4], "shorter than its 8-byte header"),
    (lambda d: (10**9).to_bytes(8, "little") + d[8:], "runs past the end"),
    (lambda d: d[:8] + b"x" + d[9:], "not JSON"),
    (lambda d: d + b"\0", "bytes after the last tensor"),
    (lambda d: d[:-4], "runs past the end of the file"),
    (lambda d: d.replace(b'"F32"', b'"X32"', 1), "unsupported"),
    (lambda d: d.replace(b'"data_offsets":[0,60]', b'"data_offsets":[4,64]', 1), "do not follow the previous tensor"),
])
def test_malformed_safetensors_are_refused_with_the_reason(damage, why):
    data = save({"a": torch.randn(3, 5), "b": torch.randn(2)})
    assert b'"data_offsets":[0,60]' in data
    with pytest.raises(IntegrityError, match=why):
        AdapterFiles({WEIGHTS: bytearray(damage(data))}, "/some/adapter").tensor_views()


# -- the registry reads each file once and checks those bytes -----------------------------------


@pytest.mark.parametrize("threaded", [False, True])
def test_read_version_returns_the_files_and_checks_the_bytes_it_read(tmp_path, threaded):
    store = open_registry(tmp_path / "registry")
    store.publish("t", make_adapter(tmp_path / "a", size=70_000))  # > 1 MB: several chunks
    with ThreadPoolExecutor(1) as hasher:
        read = store.read_version("t@1", hasher=hasher if threaded else None)
        read.check()
        for name in store.manifest("t@1").files:
            assert bytes(read.data[name]) == (tmp_path / "a" / name).read_bytes(), name
        del read
        _corrupt(_blob(store, "t@1"))  # same size, one bit flipped
        read = store.read_version("t@1", hasher=hasher if threaded else None)
        with pytest.raises(IntegrityError, match="adapter_model.safetensors.*sha256"):
            read.check()


@pytest.mark.parametrize("size", [0, 1, 256 << 10, (256 << 10) + 1, 5 * (256 << 10) + 7])
@pytest.mark.parametrize("threaded", [False, True])
def test_sha_while_reading_equals_hashlib_whatever_the_pieces(size, threaded):
    """The hasher follows the read piece by piece (slices while it goes on, the rest in one update
    once it is over): the digest is that of the bytes, however the read was cut."""
    import hashlib
    import random

    from adapterhub.registry.hashing import ShaWhileReading

    data = bytearray(random.Random(size).randbytes(size))
    view = memoryview(data)
    with ThreadPoolExecutor(1) as hasher:
        sha = ShaWhileReading(hasher if threaded else None, size)
        done, pieces = 0, random.Random(1)
        while done < size:
            done = min(size, done + pieces.randint(1, 300_000))
            sha.advanced(view, done)
        assert sha.finish().result() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("chunked", [True, False])  # per-chunk digests, or one sha256 of the file
@pytest.mark.parametrize("where", [0, (256 << 10) - 1, 256 << 10, 1 << 20, (1 << 20) + 5, -1])  # slice edges, last byte
def test_every_chunk_of_a_file_is_hashed(tmp_path, monkeypatch, where, chunked):
    from adapterhub.registry import hashing

    if not chunked:  # published as before chunk digests existed: the whole-file sha256 is checked
        monkeypatch.setattr(hashing, "chunk_size_for", lambda size: None)
    store = open_registry(tmp_path / "registry")
    store.publish("t", make_adapter(tmp_path / "a", size=70_000))  # 9 chunks of 256 KiB
    blob = _blob(store, "t@1")  # the cached copy the server reads
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[where] ^= 0x01
    blob.write_bytes(bytes(data))
    assert bool(store.manifest("t@1").files["adapter_model.safetensors"].chunks) == chunked
    with ThreadPoolExecutor(1) as hasher:
        read = store.read_version("t@1", hasher=hasher)
        with pytest.raises(IntegrityError, match="sha256"):
            read.check()


def test_a_changed_snapshot_is_refused_to_directory_readers_only(tmp_path):
    """Forms built from the bytes read need only those bytes' hashes; code that reads the snapshot
    directory itself (``AdapterFiles.directory``) gets its names and sizes checked first."""
    from adapterhub.serve.adapter_source import AdapterSource

    store = open_registry(tmp_path / "registry")
    store.publish("t", make_adapter(tmp_path / "a"))
    source = AdapterSource(tmp_path / "registry")
    files = source.read(source.resolve("t@1"))
    stray = files._directory / "stray.bin"
    stray.write_bytes(b"not in the manifest")
    files.check()  # the bytes are fine
    with pytest.raises(IntegrityError, match="stray.bin"):
        files.directory


def test_a_cached_adapter_checks_its_directory_when_the_slow_path_reads_it(cache):
    """A load with a serving form never reads the snapshot directory, so it does not list it;
    whoever asks for ``entry.directory`` later (the slow path) gets it checked then."""
    entry = cache.load("small@1")
    snapshot = cache.source.store.materialize("small@1", verify="size")
    os.chmod(snapshot, 0o755)
    (snapshot / "stray.bin").write_bytes(b"not in the manifest")
    with pytest.raises(IntegrityError, match="stray.bin"):
        entry.directory
    (snapshot / "stray.bin").unlink()
    assert entry.directory == snapshot


def test_read_version_refuses_a_file_of_another_size(tmp_path):
    store = open_registry(tmp_path / "registry")
    store.publish("t", make_adapter(tmp_path / "a"))
    blob = _blob(store, "t@1")
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes() + b"more")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        store.read_version("t@1")


# -- the LoRA form: same tensors as before, in the stacks' layout --------------------------------


@pytest.mark.parametrize("config", [
    {},
    {"r": 3, "lora_alpha": 7},  # alpha / r not a power of two: the float32 rounding must match
    {"use_rslora": True, "lora_alpha": 5},
    {"rank_pattern": {"v_proj": 6}, "alpha_pattern": {"v_proj": 11}},
])
def test_lora_form_equals_the_plain_computation_exactly(tmp_path, config):
    from adapterhub.manager import PluginManager

    directory = _lora_dir(tmp_path / "a", config)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    state = load_file(str(directory / WEIGHTS))
    form = PluginManager(autoload=False).get_method("lora").serving_form(AdapterFiles.from_directory(directory), None)
    assert len(form.deltas) == 2
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        r = cfg.get("rank_pattern", {}).get(module.rsplit(".", 1)[-1], cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], cfg["lora_alpha"])
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        A, B = form.deltas[module]
        assert torch.equal(A, a) and torch.equal(B, state[key.replace("lora_A", "lora_B")]), module
        assert form.scales[module] == scale, module  # applied by the slot write, tested in test_bgmv.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_lora_read_from_its_file_goes_to_its_slot_without_a_tensor_made(tmp_path, dtype, monkeypatch):
    """Once the stacks have its modules and shapes, a LoRA form over a file's bytes is written
    from the bytes (one C call, no view made), bit for bit what the tensor path writes; a form of
    other shapes takes the tensor path. Either way the slot holds A.T and the scaled B.T."""
    from adapterhub.adapter_files import TensorViews
    from adapterhub.manager import PluginManager
    from adapterhub.serve import bgmv
    from adapterhub.serve.kinds import region
    from adapterhub.serve.slot_pool import SlotPool
    from adapterhub.serving_forms import LoraForm

    lora = PluginManager(autoload=False).get_method("lora")
    made, raw_jobs = [], []
    view, transpose_raw = TensorViews._view, bgmv.transpose_raw
    monkeypatch.setattr(TensorViews, "_view", lambda self, *entry: made.append(entry) or view(self, *entry))
    monkeypatch.setattr(bgmv, "transpose_raw", lambda jobs, dt: raw_jobs.append(len(jobs)) or transpose_raw(jobs, dt))
    from_file, from_tensors = SlotPool(slots=2, lora_dtype=dtype), SlotPool(slots=2, lora_dtype=dtype)
    for i, size in enumerate([48, 48, 48, 40]):  # the last is narrower than the stacks: padded, by the tensor path
        directory = _lora_dir(tmp_path / f"a{i}", {}, size=size, seed=i)
        form = lora.serving_form(AdapterFiles.from_directory(directory), None)
        made.clear()
        from_file.admit(f"a{i}@1", form)
        assert bool(made) == (i in (0, 3)), f"adapter {i}: {len(made)} views made"
        state = load_file(str(directory / WEIGHTS))
        copies = lora.serving_form(AdapterFiles.from_directory(directory), None)
        copies = LoraForm({m: (a.clone(), b.clone()) for m, (a, b) in copies.deltas.items()}, dict(copies.scales))
        from_tensors.admit(f"a{i}@1", copies)
        slot = from_file.lora.slot_of[f"a{i}@1"]
        for key, tensor in state.items():
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            At, Bt = from_file.lora.tensors[module]
            expected = tensor.T.to(dtype) if ".lora_A." in key else (tensor * 2.0).T.to(dtype)  # alpha / r = 8 / 4
            assert torch.equal(region((At if ".lora_A." in key else Bt)[slot], expected.shape), expected), (i, key)
    assert raw_jobs == [4, 4], "the second and third adapters: 2 modules x (A, B), one call each"
    assert from_file.lora.rebuilds == from_tensors.lora.rebuilds
    for module, stacked in from_file.lora.tensors.items():
        assert all(torch.equal(x, y) for x, y in zip(stacked, from_tensors.lora.tensors[module])), module


# -- the cache: publish only what passed its check -----------------------------------------------


@pytest.fixture
def cache(tmp_path):
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.cache import AdapterCache

    store = open_registry(tmp_path / "registry")
    store.publish("big", _lora_dir(tmp_path / "big", {}, size=70_000))
    store.publish("small", _lora_dir(tmp_path / "small", {}, seed=1))
    return AdapterCache(AdapterSource(tmp_path / "registry"), capacity=4, base_fingerprint=FINGERPRINT, base_config=None)


@pytest.mark.parametrize("task", ["big", "small"])
def test_cache_load_refuses_a_corrupted_blob_and_keeps_nothing(cache, task):
    cache.load(f"{task}@1")
    stack = cache.pool.lora
    expected = {m: [t[stack.slot_of[f"{task}@1"]].clone() for t in ts] for m, ts in stack.tensors.items()}
    cache.unload(f"{task}@1")
    _corrupt(_blob(cache.source.store, f"{task}@1"))
    with pytest.raises(IntegrityError, match="sha256"):
        cache.load(f"{task}@1")
    assert [e.key for e in cache.snapshot()] == []
    cache.load(f"{task}@1")  # the damaged copy was dropped: fetched again from the registry, the same form
    slot = stack.slot_of[f"{task}@1"]
    assert all(torch.equal(t[slot], x) for m, ts in stack.tensors.items() for t, x in zip(ts, expected[m]))


class _Plugin:
    def __init__(self, method):
        self.method = method

    @__import__("adapterhub").hookimpl
    def adapterhub_register_methods(self, register):
        register(self.method)


@pytest.fixture
def register_method():
    from adapterhub.manager import get_manager

    names = []

    def register(method):
        get_manager().register(_Plugin(method), name=f"test-{method.name}")
        names.append(f"test-{method.name}")

    yield register
    for name in names:
        get_manager().unregister(name)


def _publish_as(cache, task: str, method: str, tmp_path) -> str:
    directory = _lora_dir(tmp_path / task, {})
    meta = json.loads((directory / "adapterhub.json").read_text())
    (directory / "adapterhub.json").write_text(json.dumps({**meta, "method": method}))
    return cache.source.store.publish(task, directory).ref


def test_a_form_built_from_corrupt_bytes_fails_as_an_integrity_error(cache, register_method, tmp_path):
    class Fragile(Method):
        name = "fragile"
        capabilities = Capabilities(mixed_batch=True)  # else the server never asks for a serving form

        def serving_form(self, files, base_config):
            files.read_tensors()  # corrupt bytes may not even parse: the hash verdict must win
            raise ValueError("these bytes make no sense")

    register_method(Fragile())
    ref = _publish_as(cache, "fragile", "fragile", tmp_path)
    with pytest.raises(PluginError, match="these bytes make no sense"):
        cache.load(ref)
    _corrupt(_blob(cache.source.store, ref))
    with pytest.raises(IntegrityError, match="sha256"):
        cache.load(ref)


def _reads_the_disk(calls: list, *, legacy: bool) -> Method:
    """A method whose serving hook reads its weights from the directory, not from the bytes given."""
    class ReadsTheDisk(Method):
        name = "reads-disk"
        capabilities = Capabilities(mixed_batch=True)

        def serving_form(self, files, base_config):
            calls.append(load_file(str(files.directory / WEIGHTS)))
            return None

    if not legacy:
        return ReadsTheDisk()
    with pytest.warns(DeprecationWarning, match=r"serving_form\(directory, base_config\) is deprecated"):
        class Legacy(Method):  # written against the hook of 0.1, which took the directory
            name = "reads-disk"
            capabilities = Capabilities(mixed_batch=True)

            def serving_form(self, directory, base_config):
                calls.append(load_file(str(Path(directory) / WEIGHTS)))
                return None

    return Legacy()


@pytest.mark.parametrize("legacy", [False, True], ids=["files.directory", "deprecated-directory-hook"])
def test_a_plugin_that_reads_its_directory_never_sees_an_unchecked_file(cache, register_method, tmp_path, legacy):
    calls = []
    register_method(_reads_the_disk(calls, legacy=legacy))
    ref = _publish_as(cache, "disk", "reads-disk", tmp_path)
    assert cache.load(ref).served is None and len(calls) == 1
    cache.unload(ref)
    _corrupt(_blob(cache.source.store, ref))
    with pytest.raises(IntegrityError):
        cache.load(ref)
    assert len(calls) == 1, "serving_form ran on a file that had not passed its hash check"


def test_one_serving_hook_and_the_deprecated_ones_adapted(tmp_path):
    """``serving_form(files, base_config)`` is the only hook the host calls; a subclass overriding it
    gets its own, by plain inheritance. The two hooks it replaced still work, each with a
    DeprecationWarning when the class is defined: ``serving_form(directory, ...)`` gets the
    directory (after the checks), ``serving_form_from_files`` becomes ``serving_form``."""
    import warnings

    from adapterhub.plugins.lora import LoraMethod

    directory = _lora_dir(tmp_path / "a", {})
    files = AdapterFiles.from_directory(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current hook warns about nothing

        class OwnForm(LoraMethod):
            name = "own-form"

            def serving_form(self, files, base_config):
                return ("own", files.read_json("adapter_config.json")["r"])

    with pytest.warns(DeprecationWarning, match=r"ByDirectory.serving_form\(directory, base_config\)"):
        class ByDirectory(LoraMethod):
            def serving_form(self, directory, base_config):
                return ("directory", Path(directory))

    with pytest.warns(DeprecationWarning, match=r"FromFiles.serving_form_from_files.*rename it serving_form"):
        class FromFiles(OwnForm):
            def serving_form_from_files(self, files, base_config):
                return ("from files", sorted(files.names()))

    assert type(LoraMethod().serving_form(files, None)).__name__ == "LoraForm"
    assert OwnForm().serving_form(files, None) == ("own", 4)
    assert ByDirectory().serving_form(files, None) == ("directory", directory)
    assert FromFiles().serving_form(files, None) == ("from files", files.names())
    assert not hasattr(LoraMethod(), "serving_form_from_files"), "the second hook is gone"


def test_a_load_writes_its_stack_slot_and_a_failed_check_frees_it(cache):
    """The loading thread writes the form into the engine's slot pool while the hash runs; bytes that
    fail the check leave no slot behind (a later load writes the repaired bytes afresh)."""
    from adapterhub.serve.slot_pool import SlotPool

    cache.load("big@1")  # its snapshot exists: the next load's only check is the one beside the form
    cache.unload("big@1")
    cache.pool = pool = SlotPool("cpu", slots=2)
    entry = cache.load("small@1")
    stack = pool.lora
    assert stack.writes == 1 and "small@1" in stack.slot_of, "the load did not write the slot"
    module, (a, _) = next(iter(entry.method.serving_form(AdapterFiles.from_directory(entry.directory), None).deltas.items()))
    assert torch.equal(stack.tensors[module][0][stack.slot_of["small@1"], :, : a.shape[0]], a.T)
    _corrupt(_blob(cache.source.store, "big@1"))
    with pytest.raises(IntegrityError, match="sha256"):
        cache.load("big@1")
    assert stack.writes == 2, "the load did not write its slot before the check ended"
    assert "big@1" not in stack.slot_of, "a slot kept for bytes that failed their check"
    cache.load("big@1")  # the damaged copy was dropped: fetched again from the registry
    assert stack.writes == 3 and "big@1" in stack.slot_of


def test_a_slot_outlives_its_residency_while_a_request_holds_it(cache):
    """Unloaded while a request still runs on it, an adapter keeps its slot (a load meanwhile grows
    the stacks rather than take it); once the request lets go, the slot may be reused."""
    from adapterhub.serve.slot_pool import SlotPool

    cache.pool = pool = SlotPool("cpu", slots=1)
    entry = cache.acquire("small@1")
    slot = pool.lora.slot_of["small@1"]
    cache.unload("small@1")
    cache.load("big@1")
    assert pool.lora.slot_of["small@1"] == slot and pool.lora.slot_of["big@1"] != slot and pool.lora.rebuilds >= 1
    assert "small@1" not in pool.lora.retired
    cache.release(entry)
    assert "small@1" in pool.lora.retired
    cache.unload("big@1")
    assert "big@1" in pool.lora.retired, "unloaded and held by no request: retired at once"


def test_an_empty_lora_form_takes_a_slot_without_failing():
    from adapterhub.serve.slot_pool import SlotPool
    from adapterhub.serving_forms import LoraForm

    pool = SlotPool(slots=2)
    pool.admit("empty@1", LoraForm({}))
    assert pool.lora.writes == 1


def test_a_load_asks_the_spinning_lora_threads_to_yield_the_cores_meanwhile(cache, monkeypatch):
    """While an adapter loads (read, hash, form), the LoRA worker of a busy pass sleeps between
    jobs instead of spinning, so the load's threads get the cores; afterwards it may spin again.
    The cache only runs the guard the engine gives it: the C backend's."""
    from adapterhub.serve import bgmv
    from adapterhub.serve.lora_backends.cpu_c import CLora

    if bgmv._bgmv is None:
        pytest.skip("serve/_bgmv.c was not built")
    seen = []
    real = type(cache)._load_files

    def load_files(self, version):
        seen.append(bgmv._bgmv.lora_yield(True) - 1)  # the count during the load, restored below
        bgmv._bgmv.lora_yield(False)
        return real(self, version)

    monkeypatch.setattr(type(cache), "_load_files", load_files)
    cache.loading = CLora(overlap=True).loading
    cache.load("small@1")
    assert seen == [1]
    assert bgmv._bgmv.lora_yield(True) == 1 and bgmv._bgmv.lora_yield(False) == 0, "the load ended its spell"
