"""Faults: a raising plugin, a broken plugin package, a blob corrupted while serving, a killed client.

Each fault fails only what depends on it; the server keeps serving everything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from serve_helpers import chat, health_status, publish_copy, running_server, serving, train_lora

from adapterhub.serve.client import Client

FAULT_ENV = "ADAPTERHUB_TEST_FAULT"


class FaultyPlugin:
    """LoRA variants whose serving hook or load raises, registered for one test and always removed."""

    @staticmethod
    def methods():
        from adapterhub.plugins.lora import LoraMethod

        class FormRaises(LoraMethod):
            name = "lora-formraises"
            peft_type = None

            def serving_form(self, files, base_config):
                raise RuntimeError("serving hook exploded")

        class LoadRaises(LoraMethod):
            name = "lora-loadraises"
            peft_type = None

            def serving_form(self, files, base_config):
                return None  # slow path, which calls load()

            def load(self, model, directory):
                raise RuntimeError("load exploded")

        return [FormRaises(), LoadRaises()]

    @__import__("adapterhub").hookimpl
    def adapterhub_register_methods(self, register):
        for method in self.methods():
            register(method)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    root = tmp_path_factory.mktemp("faults")
    lora = train_lora(tiny_base_dir, tiny_tokenizer, root, "sentiment", steps=4)
    store = open_registry(root / "registry")
    store.publish("senti", lora)
    store.publish("spare", lora)
    publish_copy(store, "formraises", lora, root, method="lora-formraises")
    publish_copy(store, "loadraises", lora, root, method="lora-loadraises")
    return {"root": root, "store": store, "registry": root / "registry", "lora": lora}


@pytest.fixture(scope="module")
def server(world, tiny_base_dir):
    with running_server(tiny_base_dir, world["registry"], max_adapters=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


@pytest.fixture
def faulty_plugin():
    from adapterhub.manager import get_manager

    manager = get_manager()
    manager.register(FaultyPlugin(), name="faulty-test")
    try:
        yield
    finally:
        manager.unregister("faulty-test")


def test_raising_plugin_fails_only_its_requests(client, faulty_plugin):
    good = client.generate(messages=chat("the good day"), adapters=["senti@1"], max_new_tokens=4)
    results: dict[str, object] = {}

    def call(name, ref):
        try:
            results[name] = client.generate(messages=chat("the good day"), adapters=[ref] if ref else [], max_new_tokens=4)
        except grpc.RpcError as exc:
            results[name] = exc

    jobs = [("form", "formraises@1"), ("load", "loadraises@1"), ("good", "senti@1"), ("base", None)]
    threads = [threading.Thread(target=call, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    form, load = results["form"], results["load"]
    assert isinstance(form, grpc.RpcError) and form.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lora-formraises" in form.details() and "serving hook exploded" in form.details()
    assert isinstance(load, grpc.RpcError), "a raising load() must fail its request"
    assert load.code() == grpc.StatusCode.FAILED_PRECONDITION and "lora-loadraises" in load.details()
    assert list(results["good"].token_ids) == list(good.token_ids)
    assert results["base"].completion_tokens > 0
    assert health_status(client.channel) == serving()
    print(f"serving_form fault -> {form.code().name}: {form.details()[:90]}")
    print(f"load fault -> {load.code().name}: {load.details()[:90]}")


def test_server_starts_with_a_broken_plugin_package(world, tiny_base_dir, tmp_path):
    site = tmp_path / "site"
    (site / "broken_plugin_pkg.py").parent.mkdir(parents=True)
    (site / "broken_plugin_pkg.py").write_text("raise ImportError('no module named torchx')\n")
    info = site / "adapterhub_plugin_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: adapterhub-plugin-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[adapterhub]\nbroken = broken_plugin_pkg\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ADAPTERHUB_DISABLE_PLUGIN_AUTOLOAD": ""}
    proc = subprocess.Popen([sys.executable, "-m", "adapterhub", "serve", "--base", str(tiny_base_dir), "--registry",
                             str(world["registry"]), "--port", "0", "--quantize", "nf4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on "), proc.stderr.read() if proc.poll() is not None else line
        with Client(line.split()[-1], timeout=120) as c:
            assert c.generate("abc", adapters=["senti@1"], max_new_tokens=2).completion_tokens == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    print("server with a broken plugin package installed: started, served, stopped cleanly")


def test_blob_corrupted_while_serving_is_refused_and_cached_copy_keeps_serving(world, client):
    store = world["store"]
    before = client.generate(messages=chat("a bad movie"), adapters=["senti@1"], max_new_tokens=4)
    assert "senti@1" in [a.ref for a in client.list_adapters().adapters]
    client.unload("spare@1")
    for ref in ("senti@1", "spare@1"):  # both versions share the blob: one corruption hits both
        sha = store.manifest(ref).files["adapter_model.safetensors"].sha256
    blob = store.root / "blobs" / sha
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(grpc.RpcError) as err:
        client.generate("abc", adapters=["spare@1"], max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "sha256" in err.value.details()
    after = client.generate(messages=chat("a bad movie"), adapters=["senti@1"], max_new_tokens=4)
    assert list(after.token_ids) == list(before.token_ids), "the resident copy should keep serving"
    assert store.verify() != []
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))  # repaired: loads again
    assert client.generate("abc", adapters=["spare@1"], max_new_tokens=2).completion_tokens == 2
    print(f"corrupted blob refused: {err.value.details()[:100]}")


KILLED_CLIENT = r"""
import sys
from adapterhub.serve.client import Client
c = Client(sys.argv[1], timeout=120)
for i, chunk in enumerate(c.stream("abc", adapters=["senti@1"], max_new_tokens=60)):
    print("chunk", flush=True)
"""


def test_client_killed_mid_stream_frees_its_slot(server, client):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, f"127.0.0.1:{server.port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "chunk", proc.stderr.read()
    proc.kill()
    proc.wait(30)
    import time

    for _ in range(200):
        if server.engine.stats() == {"pending": 0, "active": 0}:
            break
        time.sleep(0.05)
    assert server.engine.stats() == {"pending": 0, "active": 0}
    assert health_status(client.channel) == serving()
    assert client.generate("abc", adapters=["senti@1"], max_new_tokens=2).completion_tokens == 2
