"""Security: tokens per service, TLS, request limits, no pickle, no path out of the registry, size caps.

Decisions (README, "Guarantees"): Health is open (load balancers probe without credentials and learn
only SERVING/NOT_SERVING); Reflection needs the inference token (it describes the API); Admin needs
the admin token when one is set, and the inference token does not grant it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil

import grpc
import pytest
from serve_helpers import health_status, running_server, serving, train_lora, tree_state

from adapterhub.serve._proto import admin_pb2, inference_pb2
from adapterhub.serve.client import Client

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    root = tmp_path_factory.mktemp("security")
    lora = train_lora(tiny_base_dir, tiny_tokenizer, root, "sentiment", steps=4)
    store = open_registry(root / "registry")
    store.publish("senti", lora)
    store.publish("other", lora)
    return {"root": root, "store": store, "registry": root / "registry", "lora": lora}


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return err.value.code(), err.value.details()


def _admin_calls(c: Client):
    return {
        "ListAdapters": lambda: c.list_adapters(),
        "LoadAdapter": lambda: c.load("senti@1"),
        "UnloadAdapter": lambda: c.unload("senti@1"),
        "PinAdapter": lambda: c.pin("senti@1"),
        "UnpinAdapter": lambda: c.unpin("senti@1"),
        "ServerInfo": lambda: c.info(),
    }


def _inference_calls(c: Client):
    return {
        "Generate": lambda: c.generate("abc", adapters=["senti@1"], max_new_tokens=1),
        "GenerateStream": lambda: c.stream("abc", max_new_tokens=1),
    }


def _reflect(c: Client):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
    reply = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                      metadata=c.metadata, timeout=10)
    return {s.name for s in next(reply).list_services_response.service}


def test_tokens_guard_every_rpc_and_admin_has_its_own(world, tiny_base_dir):
    with running_server(tiny_base_dir, world["registry"], token="inf-token", admin_token="adm-token") as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(target) as anon, Client(target, token="wrong") as wrong, \
                Client(target, token="inf-token") as user, Client(target, token="adm-token") as admin:
            denied = 0
            for who in (anon, wrong):
                for name, call in {**_admin_calls(who), **_inference_calls(who)}.items():
                    code, details = _code(call)
                    assert code == CODE.UNAUTHENTICATED and "token" in details, (name, code)
                    denied += 1
                assert _code(lambda: _reflect(who))[0] == CODE.UNAUTHENTICATED
                denied += 1
            for name, call in _admin_calls(user).items():  # the inference token does not grant Admin
                code, details = _code(call)
                assert code == CODE.PERMISSION_DENIED and "admin token" in details, name
                denied += 1
            for name, call in _inference_calls(admin).items():  # nor the admin token Inference
                assert _code(call)[0] == CODE.UNAUTHENTICATED, name
                denied += 1
            assert user.generate("abc", adapters=["senti@1"], max_new_tokens=1).completion_tokens == 1
            assert list(user.stream("abc", max_new_tokens=1))[-1].completion_tokens == 1
            assert admin.info().cache_capacity == 4 and admin.load("senti@1").adapter.ref == "senti@1"
            assert "adapterhub.v1.Inference" in _reflect(user)
            assert health_status(anon.channel) == serving()  # health is open by design
            print(f"{denied} unauthenticated calls refused")


def _certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test-ca")).issuer_name(name("test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    return tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"


def test_tls_with_generated_ca_and_refusal_without_it(world, tiny_base_dir, tmp_path):
    ca, cert, key = _certificates(tmp_path)
    with running_server(tiny_base_dir, world["registry"], tls_cert=str(cert), tls_key=str(key), token="t") as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(target, root_cert=ca.read_bytes(), token="t") as good:
            assert good.generate("abc", max_new_tokens=2).completion_tokens == 2
        (tmp_path / "other").mkdir()
        other_ca, _, _ = _certificates(tmp_path / "other")
        refused = 0
        for client in (Client(target, token="t", timeout=5), Client(target, token="t", root_cert=other_ca.read_bytes(),
                                                                     timeout=5)):
            with client:
                assert _code(lambda: client.generate("abc", max_new_tokens=2))[0] == CODE.UNAVAILABLE
                refused += 1
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())  # system roots only
        with pytest.raises(grpc.RpcError) as err:
            health_status(channel)
        assert err.value.code() == CODE.UNAVAILABLE
        channel.close()
        print(f"TLS: 1 verified client served, {refused + 1} clients without the CA refused")


def test_request_limits_are_configurable_and_enforced(world, tiny_base_dir):
    with running_server(tiny_base_dir, world["registry"], max_message_bytes=32 * 1024, max_context_tokens=40,
                        max_new_tokens=6, max_adapters_per_request=1) as srv, \
            Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
        assert c.info().context_length == 40 and c.info().max_adapters_per_request == 1
        cases = {
            "message over 32 KiB": (dict(prompt="a" * 40_000), CODE.RESOURCE_EXHAUSTED, ""),
            "prompt over context": (dict(prompt="word " * 30), CODE.INVALID_ARGUMENT, "context length is 40"),
            "prompt + new over context": (dict(prompt="x" * 36, max_new_tokens=6), CODE.INVALID_ARGUMENT, "40"),
            "new tokens over limit": (dict(prompt="abc", max_new_tokens=7), CODE.INVALID_ARGUMENT, "limit of 6"),
            "two adapters": (dict(prompt="abc", adapters=["senti@1", "other@1"]), CODE.INVALID_ARGUMENT,
                             "--max-adapters-per-request"),
        }
        for label, (kwargs, code, words) in cases.items():
            got, details = _code(lambda: c.generate(**{"max_new_tokens": 2, **kwargs}))
            assert got == code and words in details, (label, got, details)
        # just inside every limit
        ok = c.generate("abc", adapters=["senti@1"], max_new_tokens=6)
        assert ok.completion_tokens <= 6 and ok.prompt_tokens + 6 <= 40
        print(f"{len(cases)} limit violations refused, in-limit request served")


def _forge_version(store, task: str, version: int, files: dict[str, bytes]) -> None:
    """Hand-write a manifest (as an attacker with write access to the registry would), blobs included."""
    manifest = json.loads((store.root / "tasks" / "senti" / "versions" / "1.json").read_text())
    manifest.update(task=task, version=version, files={})
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (store.root / "blobs").mkdir(exist_ok=True)
        (store.root / "blobs" / sha).write_bytes(data)
        manifest["files"][name] = {"sha256": sha, "size": len(data)}
    path = store.root / "tasks" / task / "versions" / f"{version}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))


def test_no_pickle_no_escape_and_size_cap(world, tiny_base_dir, tmp_path):
    from adapterhub.errors import IntegrityError, LimitExceeded
    from adapterhub.registry import FileStore, import_dir

    store: FileStore = world["store"]
    weights = (world["lora"] / "adapter_model.safetensors").read_bytes()
    config = (world["lora"] / "adapter_config.json").read_bytes()
    pickled = tmp_path / "pickled"
    shutil.copytree(world["lora"], pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a real pickle: int 1
    before = tree_state(store.root)
    with pytest.raises(IntegrityError, match="pickle"):
        store.publish("pickled", pickled)
    with pytest.raises(IntegrityError, match="pickle"):
        import_dir(store, "pickled", pickled, base_fingerprint="sha256:" + "0" * 64)
    (pickled / "adapter_model.bin").unlink()
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(IntegrityError, match="pickle"):
        store.publish("pickled", pickled)
    with pytest.raises(LimitExceeded, match="max_file_bytes"):
        FileStore(store.root, max_file_bytes=1000).publish("big", world["lora"])
    assert tree_state(store.root) == before, "a refused publish wrote to the registry"

    _forge_version(store, "forgedpickle", 1, {"adapter_model.bin": b"\x80\x04K\x01.", "adapter_config.json": config})
    _forge_version(store, "escape", 1, {"../../escaped.safetensors": weights, "adapter_config.json": config})
    outside = set(store.root.parent.iterdir())
    with running_server(tiny_base_dir, store.root, max_adapter_bytes=4096) as srv, \
            Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
        refusals = {
            "forgedpickle@1": (CODE.FAILED_PRECONDITION, "pickle"),
            "escape@1": (CODE.FAILED_PRECONDITION, "not allowed"),
            "senti@1": (CODE.INVALID_ARGUMENT, "--max-adapter-bytes"),
        }
        for ref, (code, words) in refusals.items():
            got, details = _code(lambda: c.generate("abc", adapters=[ref], max_new_tokens=1))
            assert got == code and words in details, (ref, got, details)
            got, details = _code(lambda: c.load(ref))
            assert got == code and words in details, (ref, got, details)
        assert c.generate("abc", max_new_tokens=1).completion_tokens == 1
    assert set(store.root.parent.iterdir()) == outside, "a manifest path left the registry"
    problems = [str(p) for p in store.verify()]
    assert any("escape" in p for p in problems) and any("forgedpickle" in p for p in problems), problems
    print(f"refused: 3 pickle publishes/imports, 1 oversize publish, {len(refusals)} forged/oversize loads x2 RPCs")
