"""One bad row never fails the batch (issue 32): a real server on 127.0.0.1, rows poisoned for real.

Poisons: an adapter whose weights overflow (NaN logits for its row), a sampling temperature that
float32 turns into 0 (submitted to the engine directly: validation now refuses it at both doors),
and a fault in a hook on the model, the way a kind's hook or a soft prompt would raise, once for
one row's prompt and once for the whole step. Innocent rows must get the very tokens they get
without the poison, the poisoned one a clear error of its own.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import httpx
import pytest
import torch
from serve_helpers import publish_copy, running_server, scaled_copy, train_lora

from adapterhub.serve import one_pass
from adapterhub.serve.client import Client

MAX_NEW = 24
INNOCENTS = [  # (prompt, adapters, temperature, seed): greedy and seeded sampling, with and without an adapter
    ("the good day", ["senti@1"], 0.0, 0),
    ("a bad movie", [], 0.0, 0),
    ("dark cold room", ["senti@1"], 0.9, 7),
    ("the food was fine", [], 0.7, 11),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    root = tmp_path_factory.mktemp("isolation")
    lora = train_lora(tiny_base_dir, tiny_tokenizer, root, "sentiment", steps=4)
    store = open_registry(root / "registry")
    store.publish("senti", lora)
    overflow = scaled_copy(tiny_base_dir, lora, root / "overflow", float("inf"))  # lora_B * inf: NaN and inf
    publish_copy(store, "overflow", overflow, root)
    return root / "registry"


@pytest.fixture(scope="module")
def server(world, tiny_base_dir):
    with running_server(tiny_base_dir, world, quantize="none", max_new_tokens=MAX_NEW, http_port=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


def _innocent_tokens(client, poison=None) -> tuple[list[list[int]], object]:
    """The innocents' tokens, sent concurrently; ``poison()`` runs once they are all generating."""
    results: list = [None] * len(INNOCENTS)
    started = threading.Barrier(len(INNOCENTS) + 1)

    def run(i, prompt, adapters, temperature, seed):
        stream = client.stream(prompt, adapters=adapters, max_new_tokens=MAX_NEW, temperature=temperature, seed=seed)
        tokens = list(next(stream).token_ids)
        started.wait(60)
        try:
            for chunk in stream:
                tokens += chunk.token_ids
            results[i] = tokens
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, *case)) for i, case in enumerate(INNOCENTS)]
    for t in threads:
        t.start()
    started.wait(60)
    outcome = poison() if poison else None
    for t in threads:
        t.join(120)
    return results, outcome


def _poisoned_sampling(server):
    """A row whose sampling raises: temperature 1e-50 is 0 in float32 (validation refuses it now, so
    it goes to the engine directly)."""
    from adapterhub.serve.requests import GenerationRequest, SamplingParams

    request = GenerationRequest(prompt="the good day", messages=None, adapters=(),
                                params=SamplingParams(max_new_tokens=MAX_NEW, temperature=1e-50, top_p=1.0, seed=1))
    with pytest.raises(Exception) as err:
        server.engine.submit(request).result()
    return err.value


def _poisoned_adapter(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("the good day", adapters=["overflow@1"], max_new_tokens=MAX_NEW)
    return err.value


def test_a_poisoned_row_fails_alone_and_the_others_keep_their_tokens(server, client):
    clean, _ = _innocent_tokens(client)
    assert all(isinstance(t, list) and len(t) > MAX_NEW // 2 for t in clean), clean  # long enough to be caught running
    assert client.generate("the good day", max_new_tokens=MAX_NEW).completion_tokens == MAX_NEW

    with_sampling, error = _innocent_tokens(client, lambda: _poisoned_sampling(server))
    assert with_sampling == clean, "a row whose sampling raised changed (or failed) the other rows"
    from adapterhub.serve.errors import RowFailed

    assert isinstance(error, RowFailed) and "failed at token 1" in str(error) and "not affected" in str(error)

    with_nan, rpc_error = _innocent_tokens(client, lambda: _poisoned_adapter(client))
    assert with_nan == clean, "a row whose adapter overflowed changed (or failed) the other rows"
    assert rpc_error.code() == grpc.StatusCode.INTERNAL
    assert "overflow@1" in rpc_error.details() and "not finite" in rpc_error.details()
    assert client.generate("the good day", adapters=["senti@1"], max_new_tokens=4).completion_tokens == 4
    print(f"poisoned rows failed alone: {error}; {rpc_error.details()[:120]}")


class HookFault:
    """A forward pre-hook on the model's embedding that raises: for a prompt holding ``marker`` (a
    row's own fault, as a kind's hook or a soft prompt may raise) or once for any step (the step's)."""

    def __init__(self, engine, marker_id: int | None = None, once: bool = False):
        self.marker_id, self.once, self.fired = marker_id, once, 0
        self.handle = engine.model.get_input_embeddings().register_forward_pre_hook(self)

    def __call__(self, _module, args):
        ids = args[0]
        if self.once and not self.fired:
            self.fired += 1
            raise RuntimeError("injected fault in the shared forward")
        if self.marker_id is not None and bool((_prompt_tokens(ids) == self.marker_id).any()):
            self.fired += 1
            raise RuntimeError("injected fault for one row's prompt")
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _prompt_tokens(ids: torch.Tensor) -> torch.Tensor:
    """The prompt tokens a pass feeds: a prefill's rows, or the one pass's newcomer rows (after the
    running rows, one token each); none in a decode step, whose tokens are generated ones."""
    if ids.shape[1] > 1:
        return ids
    layout = one_pass.active()
    return ids[layout.decode_rows:] if layout is not None else ids[:0]


class DecodeFault:
    """Hooks that raise in the LAST layer of a decode step holding a row at ``position`` (only the
    poisoned row's long prompt gets there): the earlier layers have written their cache column by
    then, so the batched step must be rewound before its rows are probed and run again."""

    def __init__(self, engine, position: int):
        self.position, self.fired, self.armed = position, 0, False
        last_layer = engine.model.model.layers[-1]
        self.handles = [engine.model.register_forward_pre_hook(self.look, with_kwargs=True),
                        last_layer.register_forward_pre_hook(self.strike)]

    def look(self, _module, args, kwargs):
        positions = kwargs.get("position_ids")
        self.armed = positions is not None and positions.shape[1] == 1 and bool((positions == self.position).any())

    def strike(self, _module, args):
        if self.armed:
            self.fired += 1
            raise RuntimeError("injected fault for one row's decode step")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_a_row_that_fails_in_a_decode_step_fails_alone_and_the_cache_rewinds(server, client, tiny_tokenizer):
    """The batched decode raises mid-forward (after some layers wrote their column): the cache must
    be rewound, the row found by probes on copies, and the others' decode rerun unchanged."""
    clean, _ = _innocent_tokens(client)
    poison = "z" * 60
    length = len(tiny_tokenizer(poison, add_special_tokens=False)["input_ids"])
    assert length > max(len(p) for p, *_ in INNOCENTS) + MAX_NEW, "an innocent row would reach the position too"

    def poisoned():
        with pytest.raises(grpc.RpcError) as err:
            client.generate(poison, max_new_tokens=MAX_NEW)
        return err.value

    with DecodeFault(server.engine, position=length + 3) as fault:
        results, error = _innocent_tokens(client, poisoned)
    assert fault.fired >= 2, "the fault never hit a batched step and then its probe"
    assert results == clean, "a row failing in a decode step changed (or failed) the other rows"
    assert error.code() == grpc.StatusCode.INTERNAL and "failed at token 5" in error.details(), error.details()
    assert "injected fault for one row's decode step" in error.details()


def _concurrent(client, prompts: list[str]) -> list:
    out: list = [None] * len(prompts)

    def run(i, prompt):
        try:
            out[i] = client.generate(prompt, max_new_tokens=8).token_ids
        except grpc.RpcError as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=job) for job in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_a_hook_that_raises_for_one_prompt_fails_that_request_alone(server, client, tiny_tokenizer):
    prompts = ["the good day", "a bad movie ~", "dark cold room"]
    clean = _concurrent(client, prompts[::2])
    marker = tiny_tokenizer("~", add_special_tokens=False)["input_ids"][-1]
    with HookFault(server.engine, marker_id=marker) as fault:
        results = _concurrent(client, prompts)
    assert fault.fired, "the poisoned prompt never reached the model"
    assert [list(r) for r in results[::2]] == [list(r) for r in clean]
    assert isinstance(results[1], grpc.RpcError) and results[1].code() == grpc.StatusCode.INTERNAL
    assert "injected fault for one row's prompt" in results[1].details() and "not affected" in results[1].details()


def test_a_fault_in_the_shared_forward_fails_its_step_is_logged_once_and_the_next_request_succeeds(
        server, client, caplog):
    engine = server.engine
    while engine.stats() != {"pending": 0, "active": 0}:
        time.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="adapterhub.serve"), HookFault(engine, once=True):
        results = _concurrent(client, ["the good day", "a bad movie", "dark cold room"])
    failed = [r for r in results if isinstance(r, grpc.RpcError)]
    assert failed, "the injected fault failed no request"
    for error in failed:
        assert error.code() == grpc.StatusCode.INTERNAL and "batch step it was in failed" in error.details()
    step_logs = [r for r in caplog.records if "batch step failed" in r.getMessage()]
    assert len(step_logs) == 1 and step_logs[0].exc_info is not None, [r.getMessage() for r in caplog.records]
    assert sum(r.exc_info is not None for r in caplog.records) == 1, "the fault was logged with more than one traceback"
    assert client.generate("abc", max_new_tokens=4).completion_tokens == 4
    assert engine.stats() == {"pending": 0, "active": 0}


@pytest.mark.parametrize("field, value", [("temperature", 1e-50), ("temperature", 5e-324), ("temperature", 1e-4),
                                          ("top_p", 1e-300), ("top_p", 1e-7), ("seed", 2**64), ("seed", -(2**63) - 1)])
def test_values_that_cannot_work_are_refused_naming_the_field(server, client, field, value):
    """The values issue 32 used to fail a whole batch: refused before they reach the engine."""
    body = {"model": server.served_name, "prompt": "abc", "max_tokens": 2, field: value}
    response = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{field} "), error
    if field != "seed" and value >= 1.2e-38:  # what a float32 proto field can carry (gRPC seeds are uint64)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("abc", max_new_tokens=2, **{field: value})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(f"{field} ")


def test_the_floors_and_the_64_bit_seeds_still_sample(server, client):
    from adapterhub.serve.requests import MIN_TEMPERATURE, MIN_TOP_P

    for seed in (2**64 - 1, -(2**63)):
        body = {"model": server.served_name, "prompt": "abc", "max_tokens": 3, "temperature": MIN_TEMPERATURE,
                "top_p": MIN_TOP_P, "seed": seed}
        response = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    assert client.generate("abc", max_new_tokens=3, temperature=1.0, seed=2**64 - 1).completion_tokens == 3
