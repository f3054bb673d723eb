"""The OpenAI HTTP API on 127.0.0.1, through the official ``openai`` client and plain ``httpx``.

One server with both doors (gRPC and HTTP) on the nf4 tiny base and the shared mixed registry,
with an inference token and a separate admin token. Greedy answers are checked against offline
generation (and against the gRPC door for the same request); errors against OpenAI's shape.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from mixed_world import (MAX_NEW, bottleneck_after, chat, method_load, offline_tokens, offline_tokens_by_forward,
                         peft_lora)
from serve_helpers import running_server

from adapterhub.serve.client import Client

TOKEN, ADMIN = "inf-token", "adm-token"
BASE = "tiny-base"


@pytest.fixture(scope="module")
def server(mixed_world, tiny_base_dir):
    with running_server(tiny_base_dir, mixed_world["registry"], http_port=0, token=TOKEN, admin_token=ADMIN,
                        max_adapters=6, served_model_name=BASE, max_new_tokens=400) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=TOKEN, max_retries=0,
                       timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(f"127.0.0.1:{server.port}", token=TOKEN, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as client:
        yield client


def _messages(text: str) -> list[dict]:
    return [{"role": role, "content": content} for role, content in chat(text)]


def _rendered(tokenizer, text: str) -> str:
    from adapterhub.data import render_prompt

    return render_prompt(tokenizer, _messages(text))


def _events(raw: bytes) -> list[bytes]:
    """The stream cut into events at the blank lines that end them; nothing may follow the last."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    return raw[:-2].split(b"\n\n")


# -- the model grammar ------------------------------------------------------------------------------


def test_model_grammar():
    from adapterhub.errors import ConfigError
    from adapterhub.serve.model_names import parse_model, resolved_model
    from adapterhub.serve.requests import ResolvedAdapter

    assert parse_model(BASE, [BASE]) == []
    assert parse_model("a@1 + b@prod:0.5", [BASE]) == [("a@1", 1.0), ("b@prod", 0.5)]
    assert parse_model("a", [BASE]) == [("a", 1.0)]
    for bad, words in [("a@1:abc", "'abc' of a@1 is not a number"), ("a@1++b", "empty adapter"),
                       ("", "model is empty"), ("a:inf", "finite")]:
        with pytest.raises(ConfigError, match=words):
            parse_model(bad, [BASE])
    resolved = [ResolvedAdapter("a@prod", "a@3", "lora", 1.0), ResolvedAdapter("b", "b@2", "adapter", 0.5)]
    assert resolved_model(resolved, BASE) == "a@3+b@2:0.5" and resolved_model([], BASE) == BASE


# -- completions and chat: the base, a tag, a composition ---------------------------------------------


@pytest.mark.parametrize("model, adapters, resolved", [
    (BASE, [], BASE),
    ("senti@prod", [("senti@prod", 1.0)], "senti@1"),
    ("senti@1:0.5+bottle@1", [("senti@1", 0.5), ("bottle@1", 1.0)], "senti@1:0.5+bottle@1"),
])
def test_chat_and_completions_equal_the_grpc_door(oai, grpc_client, tiny_tokenizer, model, adapters, resolved):
    text = "the good day"
    expected = grpc_client.generate(messages=chat(text), adapters=adapters, max_new_tokens=MAX_NEW)
    whole = oai.chat.completions.create(model=model, messages=_messages(text), max_tokens=MAX_NEW, temperature=0)
    assert whole.model == resolved and whole.object == "chat.completion"
    assert whole.choices[0].message.content == expected.text and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == {"eos": "stop"}.get(expected.finish_reason, expected.finish_reason)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          expected.completion_tokens)
    chunks = list(oai.chat.completions.create(model=model, messages=_messages(text), max_tokens=MAX_NEW,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id} and {c.model for c in chunks} == {resolved}

    prompt = _rendered(tiny_tokenizer, text)  # the raw text the chat template gives: the same tokens
    completion = oai.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
    assert completion.choices[0].text == expected.text and completion.model == resolved
    streamed = list(oai.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_adapters_field_composes_like_the_model_string(oai, grpc_client):
    expected = grpc_client.generate(messages=chat("a bad movie"), adapters=[("rev@1", 0.5), ("scale@1", 1.0)],
                                    max_new_tokens=MAX_NEW)
    reply = oai.chat.completions.create(model=BASE, messages=_messages("a bad movie"), max_tokens=MAX_NEW, temperature=0,
                                        extra_body={"adapters": [{"ref": "rev@1", "weight": 0.5}, {"ref": "scale@1"}]})
    assert reply.choices[0].message.content == expected.text and reply.model == "rev@1:0.5+scale@1"


def test_seeded_sampling_repeats_and_stop_strings_cut(oai):
    kwargs = dict(model="rev@1", prompt="abc", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first, second = (oai.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second
    full = oai.completions.create(model="rev@1", prompt="the good day", max_tokens=12, temperature=0).choices[0]
    if len(full.text) >= 3:
        stopped = oai.completions.create(model="rev@1", prompt="the good day", max_tokens=12, temperature=0,
                                         stop=full.text[1:3]).choices[0]
        assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.find(full.text[1:3])]


# -- both doors at once ---------------------------------------------------------------------------------


def test_mixed_doors_concurrent_equal_offline(server, oai, grpc_client, mixed_world, tiny_base_dir, tiny_tokenizer):
    """32 concurrent greedy requests, half HTTP (chat and completions) and half gRPC, over four adapter
    kinds (LoRA x2, bottleneck, IA3, prefix), a composition and the base, in the same batches."""
    d = mixed_world["dirs"]
    combos = {
        BASE: lambda m: m,
        "senti@prod": peft_lora(d["senti"]),
        "rev@1": peft_lora(d["rev"]),
        "bottle@1": method_load("adapter", d["bottle"]),
        "scale@1": method_load("ia3", d["scale"]),
        "pre@1": method_load("prefix", d["pre"]),
        "senti@1:0.5+bottle@1": bottleneck_after(d["bottle"], peft_lora(d["senti"], 0.5)),
    }
    prompts = ["the good day", "a bad movie", "the food was fine", "dark cold room", "warm kind team"]
    jobs = [(model, text) for text in prompts for model in combos][:32]
    jobs = [(model, text, ("http-chat", "grpc", "http-completion", "grpc")[i % 4]) for i, (model, text) in enumerate(jobs)]
    assert len(jobs) == 32 and sum(door.startswith("http") for *_, door in jobs) == 16
    barrier = threading.Barrier(len(jobs))

    def call(job):
        model, text, door = job
        barrier.wait()
        if door == "grpc":
            adapters = [] if model == BASE else [(ref, float(w or 1)) for ref, _, w in
                                                 (term.partition(":") for term in model.split("+"))]
            response = grpc_client.generate(messages=chat(text), adapters=adapters, max_new_tokens=MAX_NEW)
            return list(response.token_ids)
        if door == "http-chat":
            reply = oai.chat.completions.create(model=model, messages=_messages(text), max_tokens=MAX_NEW, temperature=0)
            return reply.choices[0].message.content
        reply = oai.completions.create(model=model, prompt=_rendered(tiny_tokenizer, text), max_tokens=MAX_NEW,
                                       temperature=0)
        return reply.choices[0].text

    start = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(call, jobs))
    served_s = time.monotonic() - start
    assert server.engine.largest_batch > 1, "requests were not batched together"
    offline = {}
    for (model, text, door), answer in zip(jobs, answers):
        if (model, text) not in offline:
            generate = offline_tokens_by_forward if model == "pre@1" else offline_tokens
            offline[(model, text)] = generate(tiny_base_dir, tiny_tokenizer, chat(text), combos[model])
        ids = offline[(model, text)]
        expected = ids if door == "grpc" else tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert answer == expected, f"{door} {model} / {text!r} differs from offline"
    assert len({tuple(v) for v in offline.values()}) >= 4, "adapters should change the output"
    print(f"32 concurrent requests (16 HTTP, 16 gRPC) equal offline in {served_s:.2f}s, "
          f"largest batch {server.engine.largest_batch}")


# -- streams on the wire --------------------------------------------------------------------------------


def test_sse_framing_byte_for_byte(http, oai):
    body = {"model": "rev@1", "prompt": "the good day", "max_tokens": MAX_NEW, "temperature": 0}
    whole = oai.completions.create(**body)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                     headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
    events = _events(raw)
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events[:-1]), raw[:400]
    chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    for chunk in chunks:
        assert set(chunk) >= {"id", "object", "created", "model", "choices"} and chunk["object"] == "text_completion"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole.choices[0].text
    assert chunks[-2]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens
    # the same stream, re-encoded the way the server frames it, is the bytes that came over the wire
    assert b"".join(b"data: " + json.dumps(c, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
                    for c in chunks) + b"data: [DONE]\n\n" == raw


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, http, oai):
    body = {"model": "senti@1", "prompt": "abc", "max_tokens": 400, "temperature": 0}
    start = time.monotonic()
    whole = oai.completions.create(**body)
    whole_s = time.monotonic() - start
    assert whole.usage.completion_tokens == 400  # a long request: leaving early must shorten it
    with http.stream("POST", "/v1/completions", json={**body, "stream": True},
                     headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        first = next(response.iter_bytes())
        assert first.startswith(b"data: ")
        left = time.monotonic()
    while server.engine.stats() != {"pending": 0, "active": 0} and time.monotonic() - left < 60:
        time.sleep(0.01)
    freed_s = time.monotonic() - left
    assert freed_s < whole_s / 2, f"the slot was freed after {freed_s:.2f}s; the whole request takes {whole_s:.2f}s"
    metrics = http.get("/metrics").text
    assert 'adapterhub_requests_total{rpc="Completions",status="CANCELLED"}' in metrics


# -- errors: OpenAI's shape, the status the gRPC door's code maps to -----------------------------------


@pytest.mark.parametrize("kwargs, error, kind", [
    (dict(model="nosuch@1"), openai.NotFoundError, "not_found_error"),
    (dict(model="senti@99"), openai.NotFoundError, "not_found_error"),
    (dict(model="otherbase@1"), openai.ConflictError, "conflict_error"),
    (dict(model="senti@1:abc"), openai.BadRequestError, "invalid_request_error"),
    (dict(model="bad/../name"), openai.BadRequestError, "invalid_request_error"),
    (dict(n=2), openai.BadRequestError, "invalid_request_error"),
    (dict(max_tokens=10_000), openai.BadRequestError, "invalid_request_error"),
    (dict(temperature=-1.0), openai.BadRequestError, "invalid_request_error"),
    (dict(extra_body={"top_k": 5}), openai.BadRequestError, "invalid_request_error"),
    (dict(messages=[]), openai.BadRequestError, "invalid_request_error"),
    (dict(messages=[{"role": "tool", "content": "x"}]), openai.BadRequestError, "invalid_request_error"),
    (dict(model="senti@1+rev@1+bottle@1+scale@1+pre@1"), openai.BadRequestError, "invalid_request_error"),
])
def test_errors_map_to_openai_errors_and_the_server_keeps_serving(oai, kwargs, error, kind):
    request = {"model": BASE, "messages": _messages("abc"), "max_tokens": 2, **kwargs}
    with pytest.raises(error) as caught:
        oai.chat.completions.create(**request)
    body = caught.value.response.json()["error"]
    assert body["type"] == kind and body["message"] and set(body) == {"message", "type", "param", "code"}
    after = oai.chat.completions.create(model=BASE, messages=_messages("abc"), max_tokens=2, temperature=0)
    assert after.usage.completion_tokens >= 1 and after.choices[0].finish_reason in ("stop", "length")


def test_error_messages_name_the_field(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=BASE, prompt="abc", max_tokens=2, extra_body={"top_k": 5})
    assert caught.value.response.json()["error"]["param"] == "top_k"
    with pytest.raises(openai.BadRequestError, match="weight 'abc' of senti@1 is not a number"):
        oai.completions.create(model="senti@1:abc", prompt="abc", max_tokens=2)


def test_deadline_auth_and_body_limit(server, http, oai):
    with pytest.raises(openai.APIStatusError) as caught:
        oai.completions.create(model=BASE, prompt="abc", max_tokens=400, extra_headers={"X-Request-Timeout": "0.001"})
    assert caught.value.status_code == 504 and caught.value.response.json()["error"]["type"] == "timeout_error"
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert http.post("/v1/completions", json={"model": BASE, "prompt": "x"}).status_code == 401
    big = http.post("/v1/completions", json={"model": BASE, "prompt": "x" * (5 * 2**20)},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"


def test_a_full_queue_is_429(mixed_world, tiny_base_dir):
    with running_server(tiny_base_dir, mixed_world["registry"], http_port=0, max_queue=0) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model="tiny", prompt="abc", max_tokens=2)
        assert caught.value.response.json()["error"]["code"] == "resource_exhausted"


# -- models, admin, health, metrics ------------------------------------------------------------------------


def test_models_lists_the_base_then_versions_and_tags(oai, http, mixed_world):
    models = list(oai.models.list())
    ids = [m.id for m in models]
    assert ids[0] == BASE and models[0].parent is None
    assert {"senti@1", "senti@prod", "rev@1", "bottle@1", "scale@1", "pre@1"} <= set(ids)
    assert "otherbase@1" not in ids  # trained on another base: not servable here
    assert all(m.parent == BASE for m in models[1:])
    assert next(m for m in models if m.id == "senti@prod").root == "senti@1"
    pages, after = [], None
    while True:
        page = http.get("/v1/models", params={"limit": 3, **({"after": after} if after else {})},
                        headers={"Authorization": f"Bearer {TOKEN}"}).json()
        pages.append(page)
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [m["id"] for p in pages for m in p["data"]] == ids and len(pages) > 1
    assert http.get("/v1/models", params={"after": "nope"}, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 400


def test_admin_over_http(http, oai):
    admin, user = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {TOKEN}"}
    with pytest.raises(openai.PermissionDeniedError):  # the openai client, holding the inference token
        oai.post("/pin_adapter", body={"adapter": "rev@1"}, cast_to=object)
    denied = http.post("/v1/pin_adapter", json={"adapter": "rev@1"}, headers=user)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert http.post("/v1/pin_adapter", json={"adapter": "rev@1"}).status_code == 401
    assert http.post("/v1/pin_adapter", json={"adapter": "rev@1"}, headers=admin).json()["adapter"]["pinned"] is True
    resident = http.get("/v1/adapters", headers=admin).json()["data"]
    assert next(a for a in resident if a["id"] == "rev@1")["pinned"] is True
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "rev@1"}, headers=admin).status_code == 400
    assert http.post("/v1/unpin_adapter", json={"adapter": "rev@1"}, headers=admin).json()["adapter"]["pinned"] is False
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "rev@1"}, headers=admin).json()["was_resident"]
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "rev@1"}, headers=admin).json()
    assert loaded["adapter"]["id"] == "rev@1" and loaded["adapter"]["method"] == "lora"
    by_path = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp/x"}, headers=admin)
    assert by_path.status_code == 404 and "lora_path is not read" in by_path.json()["error"]["message"]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "nosuch"}, headers=admin).status_code == 404


def test_health_and_metrics_are_open_on_the_http_port(http, oai):
    oai.completions.create(model=BASE, prompt="abc", max_tokens=1)
    assert http.get("/health").json() == {"status": "SERVING"}
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert 'adapterhub_requests_total{rpc="Completions",status="OK"}' in metrics.text
    missing = http.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"



def test_graceful_shutdown_finishes_the_stream_in_flight(server, http):
    """Last in the module: stopping lets a running stream finish, then the port refuses connections."""
    body = {"model": "rev@1", "prompt": "abc", "max_tokens": 200, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 30})
        stopper.start()
        rest = [line for line in lines if line]
    stopper.join(60)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] in ("length", "stop")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.http_port}/health", timeout=5)
