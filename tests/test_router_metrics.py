"""What Kubernetes routers read from ``/metrics`` and send to the adapter endpoints, on a real server.

The Gateway API Inference Extension's endpoint picker (llm-d), vLLM production-stack and AIBrix
scrape vLLM's gauge names and call vLLM's load/unload bodies. One server on 127.0.0.1 (tiny nf4
base, both doors, the metrics port) is frozen in a known state: one streamed request running,
an exclusive-path request held inside its method's ``load`` (so the scheduler stops where it is),
and two requests queued behind it. ``/metrics`` is parsed with the Prometheus parser and checked
against that state, on the HTTP door and on the metrics port.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import publish_copy, running_server, train_lora

from adapterhub.serve.client import Client

BASE = "tiny-base"
MAX_BATCH, MAX_ADAPTERS = 2, 4
FAMILIES = {"vllm:lora_requests_info", "vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "adapterhub_adapter_resident"}


class HeldLoraPlugin:
    """LoRA without a serving form (so it takes the exclusive path), whose ``load`` waits for the
    test (one release per load): while it waits the scheduler thread runs nothing, so the lists it
    reports stand still."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Semaphore(0), threading.Semaphore(0)  # one of each per load

    def make(self):
        from adapterhub.plugins.lora import LoraMethod

        plugin = self

        class HeldLora(LoraMethod):
            name = "lora-held"
            peft_type = None
            capabilities = dataclasses.replace(LoraMethod.capabilities, mixed_batch=False, composable=False)

            def serving_form(self, files, base_config):
                return None

            def load(self, model, directory):
                plugin.entered.release()
                assert plugin.release.acquire(timeout=120), "the test never released the held load"
                return super().load(model, directory)

        return HeldLora()

    @__import__("adapterhub").hookimpl
    def adapterhub_register_methods(self, register):
        register(self.make())


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    root = tmp_path_factory.mktemp("router")
    lora = train_lora(tiny_base_dir, tiny_tokenizer, root, "sentiment", steps=4)
    store = open_registry(root / "registry")
    for task in ("alpha", "beta", "gamma"):
        store.publish(task, lora)
    store.set_tag("alpha@1", "prod")
    publish_copy(store, "held", lora, root, method="lora-held")
    return {"store": store, "registry": root / "registry"}


@pytest.fixture(scope="module")
def held():
    from adapterhub.manager import get_manager

    plugin = HeldLoraPlugin()
    get_manager().register(plugin, name="lora-held-test")
    yield plugin
    plugin.release.release(100)
    get_manager().unregister(name="lora-held-test")


@pytest.fixture(scope="module")
def server(world, tiny_base_dir, held):
    with running_server(tiny_base_dir, world["registry"], http_port=0, metrics_port=0, max_adapters=MAX_ADAPTERS,
                        max_batch=MAX_BATCH, served_model_name=BASE, max_new_tokens=400) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as client:
        yield client


def scrape(url: str) -> dict:
    """name -> list of (labels, value), through the Prometheus text parser."""
    text = httpx.get(url, timeout=30).text
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def doors(server) -> list[str]:
    return [f"http://127.0.0.1:{server.http_port}/metrics", f"http://127.0.0.1:{server.metrics_port}/metrics"]


def digest(store, ref: str) -> str:
    return "sha256:" + hashlib.sha256(store.manifest(ref).to_json().encode()).hexdigest()


def lora_info(families: dict) -> tuple[dict, float]:
    (labels, value), = families["vllm:lora_requests_info"]  # one series: the EPP reads the latest
    return labels, value


def wait_for(condition, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_an_idle_server_reports_nothing_running(server):
    for url in doors(server):
        families = scrape(url)
        assert FAMILIES <= set(families)
        labels, _ = lora_info(families)
        assert labels == {"max_lora": str(MAX_ADAPTERS), "running_lora_adapters": "", "waiting_lora_adapters": ""}
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                     "vllm:gpu_cache_usage_perc"):
            assert families[name] == [({"model_name": BASE}, 0.0)], name
        assert families["adapterhub_adapter_resident"] == []


def check_frozen(server, store, running: list[str], waiting: list[str]) -> None:
    """Scrape both endpoints while the scheduler waits in a held load, and check them against the
    engine's lists (the same now as when scraped) and against what the test sent."""
    engine = server.engine
    rows, queued = engine.in_flight()
    before = time.time()
    scraped = [scrape(url) for url in doors(server)]
    after = time.time()
    assert engine.in_flight() == (rows, queued), "the engine moved during the scrape: the test did not hold it"
    usage = sum(s.prefix_len + len(s.prompt_ids) + len(s.generated) for s in rows) / (
        MAX_BATCH * engine.limits.context_length)
    assert usage > 0
    for families in scraped:
        labels, stamp = lora_info(families)
        assert labels == {"max_lora": str(engine.cache.capacity), "running_lora_adapters": ",".join(running),
                          "waiting_lora_adapters": ",".join(waiting)}
        assert before - 1 <= stamp <= after + 1, "the value is the time of the scrape, as vLLM sets it"
        assert families["vllm:num_requests_running"] == [({"model_name": BASE}, float(len(rows)))]
        assert families["vllm:num_requests_waiting"] == [({"model_name": BASE}, float(len(queued)))]
        assert families["vllm:kv_cache_usage_perc"] == [({"model_name": BASE}, pytest.approx(usage, abs=1e-12))]
        assert families["vllm:gpu_cache_usage_perc"] == families["vllm:kv_cache_usage_perc"]
        resident = [(s["adapter"], s["digest"], s["method"], value) for s, value in families["adapterhub_adapter_resident"]]
        assert sorted(resident) == sorted((e.key, digest(store, e.key), e.method.name, 1.0)
                                          for e in engine.cache.snapshot())


def test_running_and_waiting_adapters_and_residency_match_the_engine(server, world, held):
    """Held load 1 freezes the scheduler with requests queued behind it; released, the scheduler
    admits the next request into the batch and stops again in held load 2 (the request after it)."""
    engine, store = server.engine, world["store"]
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"

    def pending(n: int) -> None:  # each request queued before the next is sent: the order is known
        wait_for(lambda: len(engine.in_flight()[1]) == n, f"{n} requests queued")

    with ThreadPoolExecutor(6) as pool, Client(f"127.0.0.1:{server.port}", timeout=120) as grpc_client:
        try:
            first_held = pool.submit(httpx.post, url, timeout=120, json={"model": "held@1", "prompt": "abc", "max_tokens": 4})
            assert held.entered.acquire(timeout=60), "the exclusive-path request never reached its load"
            streamed = pool.submit(lambda: httpx.post(url, timeout=120, json={
                "model": "alpha@prod", "prompt": "abc", "max_tokens": 8, "stream": True}).text)
            pending(1)
            second_held = pool.submit(httpx.post, url, timeout=120, json={"model": "held@1", "prompt": "xy", "max_tokens": 4})
            pending(2)
            by_grpc = pool.submit(grpc_client.generate, "abc", adapters=["beta@1"], max_new_tokens=4)
            pending(3)
            composed = pool.submit(httpx.post, url, timeout=120, json={"model": "gamma@1+alpha@1:0.5", "prompt": "abc",
                                                                        "max_tokens": 4})
            pending(4)
            assert {e.key for e in engine.cache.snapshot()} == {"held@1", "alpha@1", "beta@1", "gamma@1"}
            check_frozen(server, store, ["held@1"], ["alpha@prod", "held@1", "beta@1", "gamma@1", "alpha@1"])

            held.release.release()  # the first held request runs; the batch takes the stream, then stops at the second
            assert held.entered.acquire(timeout=60), "the second exclusive-path request never reached its load"
            check_frozen(server, store, ["alpha@prod", "held@1"], ["beta@1", "gamma@1", "alpha@1"])
        finally:
            held.release.release(10)
        assert first_held.result(120).status_code == 200 and second_held.result(120).status_code == 200
        assert streamed.result(120).endswith("data: [DONE]\n\n")
        assert by_grpc.result(120).completion_tokens > 0 and composed.result(120).status_code == 200
    wait_for(lambda: engine.in_flight() == ([], []), "the server to go idle")
    for families in map(scrape, doors(server)):
        labels, _ = lora_info(families)
        assert (labels["running_lora_adapters"], labels["waiting_lora_adapters"]) == ("", "")
        assert families["vllm:kv_cache_usage_perc"] == [({"model_name": BASE}, 0.0)]


def test_vllm_load_and_unload_bodies_move_the_residency_gauge(server, http, world):
    store, url = world["store"], doors(server)[0]
    sidecar_load = {"lora_name": "beta@1", "lora_path": "/adapters/beta", "base_model_name": "some/base"}
    assert http.post("/v1/load_lora_adapter", json=sidecar_load).status_code == 200
    assert ("beta@1", digest(store, "beta@1")) in {(s["adapter"], s["digest"]) for s, _ in
                                                  scrape(url)["adapterhub_adapter_resident"]}
    unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "beta@1", "lora_int_id": 2})
    assert unloaded.status_code == 200 and unloaded.json() == {"id": "beta@1", "was_resident": True}
    after = {s["adapter"] for s, _ in scrape(url)["adapterhub_adapter_resident"]}
    assert "beta@1" not in after and after == {e.key for e in server.engine.cache.snapshot()}
    missing = http.post("/v1/load_lora_adapter", json={"lora_name": "nosuch@1", "lora_path": "/adapters/nosuch"})
    assert missing.status_code == 404 and "lora_path is not read" in missing.json()["error"]["message"]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "beta@1", "typo": 1}).status_code == 400
