"""adapterhub on Ray Serve (``serve/ray_app.py``): a real local cluster on 127.0.0.1, two replicas of the
engine on the nf4 tiny base, LoRA adapters in one registry, the official ``openai`` client.

One cluster for the module (starting it and two replicas is most of the time here); the tests run
in file order and the last one kills a replica. Skipped where the ``ray`` extra is not installed.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve", reason="the optional extra: pip install 'adapterhub[ray]'")

import openai  # noqa: E402
from serve_helpers import OfflineLora, chat, scaled_copy, train_lora  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network here

BASE = "tiny-base"
MAX_NEW = 6
LONG = 300  # tokens of the streams a replica is killed under
PROMPT = "the good day"
CAPACITY = 4  # adapters per replica: fewer than a load's 6 distinct ones (at random, a third miss), 2 x 4 hold them
CHECKED = [f"p{i}" for i in range(3)]
AFFINE, SPREAD = ([f"{prefix}{i}" for i in range(6)] for prefix in ("a", "s"))
TALKERS = [f"talk{i}" for i in range(4)]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    """Checked LoRA versions (scaled copies of two trained ones: their greedy answers have clear winners)
    with their offline answers; random LoRAs for the routing loads, whose answers are not compared
    (near-ties); random ones that talk past ``LONG`` tokens, to kill a replica under their streams."""
    from adapterhub.registry import open_registry

    work = tmp_path_factory.mktemp("ray")
    sources = [train_lora(tiny_base_dir, tiny_tokenizer, work, task, steps=6) for task in ("sentiment", "reverse")]
    store = open_registry(work / "registry")
    for i, task in enumerate(CHECKED + ["moving", "moving"]):
        store.publish(task, scaled_copy(tiny_base_dir, sources[i % 2], work / f"scaled-{i}", 0.6 + 0.2 * i))
    store.set_tag("moving@1", "prod")
    randoms = dict(zip(AFFINE + SPREAD + TALKERS, _random_loras(tiny_base_dir, work, AFFINE + SPREAD + TALKERS)))
    for task, directory in randoms.items():
        store.publish(task, directory)
    checked = [f"{t}@1" for t in CHECKED] + ["moving@1", "moving@2"]
    dirs = {ref: store.materialize(ref) for ref in checked}
    offline = OfflineLora(tiny_base_dir, tiny_tokenizer, list(dirs.values()) + [randoms[t] for t in TALKERS])
    expected = {ref: offline.tokens(dirs[ref], chat(PROMPT), MAX_NEW) for ref in checked}
    long = [t for t in TALKERS if len(offline.tokens(randoms[t], chat(PROMPT), LONG)) == LONG]
    return SimpleNamespace(store=store, registry=work / "registry", expected=expected, long=long,
                           text={ref: tiny_tokenizer.decode(ids, skip_special_tokens=True) for ref, ids in expected.items()})


def _random_loras(base_dir, work, names: list[str]) -> list:
    """LoRA adapters with small random B, one seed each (no training)."""
    import torch

    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.manager import PluginManager

    method = PluginManager(autoload=False).get_method("lora")
    config = method.make_config({"r": 8, "alpha": 16.0})
    model = method.attach(load_base(base_dir, "none").model, config)
    out = []
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        out.append(save_adapter(method, model, config, work / f"random-{name}",
                                base={"name": "tiny", "fingerprint": fingerprint(base_dir)}))
    return out


@pytest.fixture(scope="module")
def fleet(world, tiny_base_dir):
    import ray
    from ray import serve

    from adapterhub.serve import ray_app
    from adapterhub.serve.server import ServerOptions

    options = ServerOptions(base=str(tiny_base_dir), registry=str(world.registry), quantize="nf4",
                            max_adapters=CAPACITY, max_new_tokens=LONG, served_model_name=BASE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        ray_app.deploy(options, host="127.0.0.1", port=port, replicas=2, timeout_s=60)
        yield SimpleNamespace(port=port, options=options, app=ray_app)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def oai(fleet):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.port}/v1", api_key="none", max_retries=0,
                       timeout=60) as client:
        yield client


def _messages(text: str = PROMPT) -> list[dict]:
    return [{"role": role, "content": content} for role, content in chat(text)]


def _ask(oai, model: str, max_tokens: int = MAX_NEW):
    """One greedy chat request; (the parsed completion, the replica that answered, hit/miss)."""
    raw = oai.chat.completions.with_raw_response.create(model=model, messages=_messages(), max_tokens=max_tokens,
                                                        temperature=0)
    return raw.parse(), raw.headers.get("x-adapterhub-replica"), raw.headers.get("x-adapterhub-affinity")


def test_answers_equal_offline_generation(oai, world, tiny_tokenizer, tiny_base_dir):
    from adapterhub.data import render_prompt
    from adapterhub.serve.requests import GenerationRequest
    from adapterhub.serve.server import AdapterServer, ServerOptions

    for task in CHECKED:
        ref = f"{task}@1"
        whole, replica, outcome = _ask(oai, task)
        assert (whole.model, whole.choices[0].message.content) == (ref, world.text[ref])
        assert whole.usage.completion_tokens == len(world.expected[ref]) and replica and outcome in ("hit", "miss")
        chunks = list(oai.chat.completions.create(model=task, messages=_messages(), max_tokens=MAX_NEW, temperature=0,
                                                  stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == world.text[ref]
        prompt = render_prompt(tiny_tokenizer, _messages())
        completion = oai.completions.create(model=ref, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        assert completion.choices[0].text == world.text[ref]

    # a composition through the fleet answers as the same composition on one server
    model = "p0@1:0.5+p1"
    one = AdapterServer(ServerOptions(base=str(tiny_base_dir), registry=str(world.registry), quantize="nf4", port=0))
    try:
        alone = one.engine.submit(GenerationRequest.build(messages=chat(PROMPT), adapters=[("p0@1", 0.5), ("p1@1", 1.0)],
                                                          max_new_tokens=MAX_NEW), stream=False).result()
    finally:
        one.stop(grace=1)
    whole, _, _ = _ask(oai, model)
    assert (whole.model, whole.choices[0].message.content) == ("p0@1:0.5+p1@1", alone.text)

    with pytest.raises(openai.NotFoundError, match="p9"):  # the door's own error, through the ingress
        _ask(oai, "p9@1")


def test_a_moved_tag_is_served_at_once(oai, world):
    assert world.text["moving@1"] != world.text["moving@2"], "the two versions should answer differently"
    for _ in range(3):  # resident on whichever replicas answered
        whole, _, _ = _ask(oai, "moving@prod")
        assert (whole.model, whole.choices[0].message.content) == ("moving@1", world.text["moving@1"])
    world.store.set_tag("moving@2", "prod")
    for _ in range(2):
        whole, _, _ = _ask(oai, "moving@prod")
        assert (whole.model, whole.choices[0].message.content) == ("moving@2", world.text["moving@2"])


def _load(oai, fleet, tasks: list[str], requests: int, seed: int) -> dict:
    """``requests`` over ``tasks`` from 4 threads, after one request each to warm up (counted apart);
    the replicas' own counts of it, checked against the headers'."""
    for task in tasks:
        _ask(oai, task)
    time.sleep(0.5)  # Ray pushes each replica's keys to the routers every 0.1 s
    before = fleet.app.affinity_counts()
    rng = random.Random(seed)
    order = [rng.choice(tasks) for _ in range(requests)]
    with ThreadPoolExecutor(4) as pool:
        seen = Counter(outcome for _, _, outcome in pool.map(lambda task: _ask(oai, task), order))
    after = fleet.app.affinity_counts()
    counts = {kind: sum(r[kind] for r in after.values()) - sum(r[kind] for r in before.values())
              for kind in ("hits", "misses")}
    assert (counts["hits"], counts["misses"]) == (seen["hit"], seen["miss"])  # the ledger has every count
    return {**counts, "rate": counts["hits"] / requests}


def test_multiplexed_routing_beats_random(oai, fleet):
    affine = _load(oai, fleet, AFFINE, 60, seed=1)
    fleet.app.set_affinity(False)
    try:
        spread = _load(oai, fleet, SPREAD, 60, seed=1)
    finally:
        fleet.app.set_affinity(True)
    # routed by key, each replica keeps about half of the 6; at random each sees all 6 through 4 slots
    assert affine["rate"] >= 0.8 and affine["rate"] >= spread["rate"] + 0.2, (affine, spread)


def test_a_killed_replica_does_not_hang_the_others(oai, fleet, world):
    import signal

    from ray import serve

    assert world.long, f"no adapter answers {LONG} tokens: no stream to kill a replica under"
    pids = {replica: counts["pid"] for replica, counts in fleet.app.affinity_counts().items()}
    first_chunk, replicas, outcomes = threading.Event(), {}, {}

    def stream(task: str) -> None:
        try:
            with oai.chat.completions.with_streaming_response.create(
                    model=task, messages=_messages(), max_tokens=LONG, temperature=0, stream=True) as response:
                replicas[task] = response.headers.get("x-adapterhub-replica")
                chunks = iter(response.parse())
                next(chunks)
                if task == world.long[0]:
                    first_chunk.set()
                last = list(chunks)[-1]
            outcomes[task] = ("done", last.choices[0].finish_reason)
        except openai.APIError as exc:
            outcomes[task] = ("error", str(exc))

    threads = [threading.Thread(target=stream, args=(task,), daemon=True) for task in world.long]
    for t in threads:
        t.start()
    assert first_chunk.wait(timeout=60)  # its replica has LONG - 1 tokens to go
    victim = replicas[world.long[0]]
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    with ThreadPoolExecutor(4) as pool:  # meanwhile new requests: the survivor answers (sent again if need be)
        answers = list(pool.map(lambda task: _ask(oai, task), CHECKED * 3))
    for t in threads:
        t.join(timeout=max(1.0, 90 - (time.monotonic() - killed)))
    assert not any(t.is_alive() for t in threads), f"a stream hung: {outcomes}"
    assert [(a.model, a.choices[0].message.content) for a, _, _ in answers] == \
        [(f"{t}@1", world.text[f"{t}@1"]) for t in CHECKED * 3]
    assert victim not in {replica for _, replica, _ in answers}
    kind, detail = outcomes[world.long[0]]  # cut mid-answer: the door's error event, which the client raises
    assert kind == "error" and "went away mid-answer" in detail, outcomes
    for task in world.long[1:]:  # the others: whole, unless the victim was serving them too
        assert outcomes[task][0] == "done" or replicas[task] == victim, (task, outcomes)

    deadline = time.monotonic() + 120  # and Ray Serve starts a replica in its place
    while time.monotonic() < deadline:
        states = serve.status().applications[fleet.app.APP].deployments["Replica"].replica_states
        if states.get("RUNNING") == 2 and set(fleet.app.affinity_counts()) - set(pids):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replacement replica within 120 s: {states}, {fleet.app.affinity_counts()}")
