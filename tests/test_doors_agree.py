"""Issue 32's small items on the serving doors, each reproduced on a real server on 127.0.0.1.

A request means the same at every door and an error names what the client sent: lone surrogates,
seeds, weights of 0, ``max_tokens``, an unknown model, wrong content types; one damaged manifest
does not hide the catalog; no server directory reaches a client; the OpenAPI schema documents the
400 this door sends; ``adapterhub generate`` takes the HTTP composition syntax and refuses a token
variable that is not set.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import httpx
import pytest
from serve_helpers import publish_copy, running_server, scaled_copy, train_lora

from adapterhub.serve.client import Client

BASE = "tiny-base"
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.-]+/){2,}")


class NoFormPlugin:
    """A LoRA without a serving form: its requests take the exclusive path."""

    @__import__("adapterhub").hookimpl
    def adapterhub_register_methods(self, register):
        from adapterhub.plugins.lora import LoraMethod

        class NoFormLora(LoraMethod):
            name = "lora-noform"
            peft_type = None

            def serving_form(self, files, base_config):
                return None

        register(NoFormLora())


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    root = tmp_path_factory.mktemp("doors")
    lora = train_lora(tiny_base_dir, tiny_tokenizer, root, "sentiment", steps=4)
    store = open_registry(root / "registry")
    for task in ("a", "b", "broken", "z"):
        store.publish(task, lora)
    store.publish("rotten", scaled_copy(tiny_base_dir, lora, root / "rotten", 0.5))  # a blob of its own to damage
    publish_copy(store, "noform", lora, root, method="lora-noform")
    return {"root": root, "store": store, "registry": root / "registry"}


@pytest.fixture(scope="module")
def server(world, tiny_base_dir):
    from adapterhub.manager import get_manager

    manager = get_manager()
    manager.register(NoFormPlugin(), name="noform-doors-test")
    try:
        with running_server(tiny_base_dir, world["registry"], quantize="none", http_port=0, served_model_name=BASE,
                            max_new_tokens=64, max_context_tokens=128) as srv:
            yield srv
    finally:
        manager.unregister("noform-doors-test")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- point 4 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % BASE,
     "messages[0].content"),
    ("/v1/completions", '{"model": "%s", "prompt": "ab\\udfffc"}' % BASE, "prompt"),
    ("/v1/completions", '{"model": "%s", "prompt": "abc", "stop": ["\\ud800"]}' % BASE, "stop[0]"),
    ("/v1/completions", '{"model": "a@1+\\ud800", "prompt": "abc"}', "adapters[1]"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(http, path, body, field):
    error = _error(http.post(path, content=body, headers={"content-type": "application/json"}), 400)
    assert error["message"].startswith(f"{field}: ") and "surrogate" in error["message"], error


def test_a_surrogate_pair_is_text_and_is_served(http):
    body = '{"model": "%s", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}' % BASE
    assert http.post("/v1/completions", content=body, headers={"content-type": "application/json"}).status_code == 200


def test_one_damaged_manifest_leaves_the_rest_of_the_catalog_listed(world, http):
    before = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "broken@1" in before
    manifests = [p for p in Path(world["registry"]).rglob("*.json") if _describes(p, "broken", 1)]
    assert manifests, "found no manifest file for broken@1"
    for path in manifests:
        path.chmod(0o644)
        path.write_text("{ not json")
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    after = [m["id"] for m in response.json()["data"]]
    assert after == [m for m in before if m != "broken@1"], after
    assert ABSOLUTE_PATH.search(response.text) is None, response.text


def _describes(path: Path, task: str, version: int) -> bool:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("task") == task and data.get("version") == version


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_a_seed_over_64_bits_is_a_400_on_the_exclusive_path(http, seed):
    body = {"model": "noform@1", "prompt": "abc", "max_tokens": 2, "temperature": 1.0, "seed": seed}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert error["message"].startswith("seed ") and "64 bits" in error["message"]


@pytest.mark.parametrize("seed", [2**64 - 1, -1])
def test_64_bit_seeds_sample_on_the_exclusive_path(http, seed):
    body = {"model": "noform@1", "prompt": "abc", "max_tokens": 3, "temperature": 1.0, "seed": seed}
    first, again = (http.post("/v1/completions", json=body) for _ in range(2))
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_a_weight_of_zero_is_refused_not_run_at_one(http, grpc_client):
    error = _error(http.post("/v1/completions", json={"model": "a@1:0", "prompt": "abc", "max_tokens": 2}), 400)
    assert "weight of a@1 is 0" in error["message"], error
    error = _error(http.post("/v1/completions", json={"model": BASE, "adapters": [{"ref": "a@1", "weight": 0}],
                                                       "prompt": "abc", "max_tokens": 2}), 400)
    assert "weight 0.0" in error["message"] and "leave it out" in error["message"], error
    reply = http.post("/v1/completions", json={"model": "a@1:0.5", "prompt": "abc", "max_tokens": 2}).json()
    assert reply["model"] == "a@1:0.5"
    # gRPC's weight is a proto3 float: 0 is "unset", documented as 1
    response = grpc_client.generate("abc", adapters=[("a@1", 0.0)], max_new_tokens=2)
    assert [(a.resolved, a.weight) for a in response.adapters] == [("a@1", 1.0)]


def test_no_server_directory_reaches_an_inference_client(world, server, http, grpc_client):
    models = http.get("/v1/models").json()["data"]
    assert models[0]["id"] == BASE and models[0]["root"] == BASE
    store = world["store"]
    sha = store.manifest("rotten@1").files["adapter_model.safetensors"].sha256
    blobs = [p for p in Path(world["registry"]).rglob(f"*{sha}*") if p.is_file()]
    assert blobs, "found no blob to damage"
    for blob in blobs:
        blob.chmod(0o644)
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF
        blob.write_bytes(bytes(data))
    error = _error(http.post("/v1/completions", json={"model": "rotten@1", "prompt": "abc", "max_tokens": 2}), 409)
    with pytest.raises(grpc.RpcError) as err:
        grpc_client.generate("abc", adapters=["rotten@1"], max_new_tokens=2)
    for message in (error["message"], err.value.details()):
        assert "sha256" in message and str(world["root"]) not in message and not ABSOLUTE_PATH.search(message), message


def test_openapi_documents_the_400_this_door_sends(http):
    schema = http.get("/openapi.json").json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    ref = completions["400"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ErrorResponse"
    detail = schema["components"]["schemas"]["ErrorDetail"]
    sent = _error(http.post("/v1/completions", json={"model": BASE, "prompt": "abc", "max_tokens": 0}), 400)
    assert set(sent) == set(detail["properties"]) and set(detail["required"]) <= set(sent)


# -- point 5 ----------------------------------------------------------------------------------------


def test_http_errors_name_max_tokens_and_grpc_errors_max_new_tokens(http, grpc_client):
    over = _error(http.post("/v1/completions", json={"model": BASE, "prompt": "abc", "max_tokens": 65}), 400)
    context = _error(http.post("/v1/completions", json={"model": BASE, "prompt": "abc " * 30, "max_tokens": 64}), 400)
    chat = _error(http.post("/v1/chat/completions", json={"model": BASE, "max_completion_tokens": 65,
                                                          "messages": [{"role": "user", "content": "hi"}]}), 400)
    for error in (over, context, chat):
        assert "max_tokens" in error["message"] and "max_new_tokens" not in error["message"], error
    with pytest.raises(grpc.RpcError) as err:
        grpc_client.generate("abc " * 30, max_new_tokens=64)
    assert "max_new_tokens" in err.value.details()


def test_an_unknown_model_names_the_served_base(http):
    error = _error(http.post("/v1/chat/completions", json={"model": "gpt-4o",
                                                           "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert "'gpt-4o'" in error["message"] and repr(BASE) in error["message"] and "/v1/models" in error["message"]


def test_a_wrong_content_type_says_so(http):
    body = json.dumps({"model": BASE, "prompt": "abc"})
    error = _error(http.post("/v1/completions", content=body, headers={"content-type": "text/plain"}), 400)
    assert "Content-Type: application/json" in error["message"] and "'text/plain'" in error["message"], error


def test_the_load_endpoint_names_the_command_that_exists(http):
    """``lora_path`` is not read: the hint must name the registry's real command (``import``)."""
    import argparse

    from adapterhub.cli import build_parser

    error = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "nosuch@1", "lora_path": "/tmp/x"}), 404)
    command = re.search(r"`adapterhub registry (\w+) ", error["message"])
    assert command, error["message"]
    registry = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["registry"]
    verbs = next(a for a in registry._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert command.group(1) in verbs, (command.group(1), sorted(verbs))


def test_generate_takes_the_http_composition_syntax(server, capsys):
    from adapterhub.cli import main

    assert main(["generate", "--server", f"127.0.0.1:{server.port}", "--adapter", "a@1+b@1:0.5",
                 "--max-new-tokens", "2", "abc"]) == 0
    assert "a@1 -> a@1, b@1 -> b@1" in capsys.readouterr().err
    assert main(["generate", "--server", f"127.0.0.1:{server.port}", "--adapter", "a@1:0", "abc"]) == 2
    assert "weight of a@1 is 0" in capsys.readouterr().err


def test_generate_refuses_a_token_variable_that_is_not_set(server, capsys, monkeypatch):
    from adapterhub.cli import main

    monkeypatch.delenv("ADAPTERHUB_TEST_UNSET_TOKEN", raising=False)
    assert main(["generate", "--server", f"127.0.0.1:{server.port}", "--token-env", "ADAPTERHUB_TEST_UNSET_TOKEN",
                 "abc"]) == 2
    assert "--token-env ADAPTERHUB_TEST_UNSET_TOKEN" in capsys.readouterr().err
    monkeypatch.delenv("ADAPTERHUB_TOKEN", raising=False)  # the default variable, unset: no token, as before
    assert main(["generate", "--server", f"127.0.0.1:{server.port}", "--max-new-tokens", "1", "abc"]) == 0
