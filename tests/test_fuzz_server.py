"""500 random GenerateRequests against a live server: a response or a proper status, never INTERNAL.

Hypothesis draws every field (unicode / empty / huge prompts, chat turns with odd roles, adapter
references valid and not, weights with NaN/inf, temperatures, top_p, seeds, stop strings, small
and absurd max_new_tokens). The server keeps max_new_tokens at 4 so 0 (the default) stays cheap.
"""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import health_status, publish_copy, running_server, serving, train_lora

from adapterhub.serve.client import Client

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
VALID_REFS = ["senti", "senti@1", "senti@latest", "senti@prod", "other@1"]
SEEN: Counter = Counter()


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    root = tmp_path_factory.mktemp("fuzz")
    lora = train_lora(tiny_base_dir, tiny_tokenizer, root, "sentiment", steps=4)
    store = open_registry(root / "registry")
    store.publish("senti", lora)
    store.set_tag("senti@1", "prod")
    publish_copy(store, "other", lora, root, base={"name": "x", "fingerprint": "sha256:" + "1" * 64})
    with running_server(tiny_base_dir, root / "registry", max_new_tokens=4, max_adapters=2) as srv, \
            Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
        yield client


refs = st.one_of(
    st.sampled_from(VALID_REFS),
    st.sampled_from(["../x", "a@", "a@-1", "a@0", "@", "senti@99", "senti@nosuchtag", "x" * 10_000, "a/b", "senti@1@2"]),
    st.text(max_size=30),
)
weights = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, -1.0, 0.5, 10.0, 10.5]))
prompts = st.one_of(st.text(max_size=40), st.just(""), st.text(alphabet="ab é😀\n", min_size=500, max_size=3000))
messages = st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "bogus", ""]), st.text(max_size=30)),
                    max_size=3)
wild = st.builds(
    Client.request,
    prompts,
    messages=messages,
    adapters=st.lists(st.tuples(refs, weights), max_size=5),
    max_new_tokens=st.one_of(st.integers(0, 4), st.sampled_from([5, 10**9, 2**32 - 1])),
    temperature=st.one_of(st.floats(width=32), st.floats(0, 2, width=32)),
    top_p=st.one_of(st.floats(width=32), st.floats(0, 1, width=32)),
    seed=st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(max_size=70), max_size=10),
)
plausible = st.builds(  # mostly valid, so the generation paths get fuzzed too, not only validation
    Client.request,
    st.text(min_size=1, max_size=60),
    adapters=st.lists(st.tuples(st.sampled_from(VALID_REFS[:4] + ["senti@99"]), st.floats(-2, 2, width=32)), max_size=2),
    max_new_tokens=st.integers(0, 4),
    temperature=st.floats(0, 2, width=32),
    top_p=st.floats(0, 1, width=32),
    seed=st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(min_size=1, max_size=8), max_size=3),
)
requests = st.one_of(wild, plausible)


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests, stream=st.booleans())
def test_random_requests_get_a_response_or_a_proper_status(live, request, stream):
    try:
        if stream:
            chunks = list(live.inference.GenerateStream(request, timeout=60))
            assert chunks and chunks[-1].finish_reason in ("length", "eos", "stop")
        else:
            response = live.inference.Generate(request, timeout=60)
            assert response.finish_reason in ("length", "eos", "stop") and response.completion_tokens <= 4
        SEEN["OK"] += 1
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details(), request)
        assert exc.details() and "internal error" not in exc.details()
        SEEN[exc.code().name] += 1
    if sum(SEEN.values()) % 50 == 0:
        assert health_status(live.channel) == serving()


@pytest.mark.parametrize("ref", ["ü" * 20_000 + "@1", "a" * 20_000, "é@" + "9" * 5000])
def test_huge_values_echoed_in_errors_still_arrive_as_invalid_argument(live, ref):
    """Error details quote the bad value; they must stay under the metadata limit."""
    with pytest.raises(grpc.RpcError) as caught:
        live.generate("abc", adapters=[ref], max_new_tokens=2)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert 0 < len(caught.value.details()) <= 3000


@pytest.mark.parametrize("text", ["x" * 50_000, "º@𘀫𵖋º\x1e" * 3000, "%" * 9000, "ok"])
def test_status_details_fit_the_metadata_limit(text):
    from urllib.parse import quote

    from adapterhub.serve.interceptors import MAX_DETAILS_BYTES, shorten

    short = shorten(f"bad value {text!r}")
    assert len(quote(short, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")) <= MAX_DETAILS_BYTES
    assert short.startswith("bad value") and (len(text) > 100 or short.endswith("'ok'"))


def test_fuzz_counts_and_health(live):
    """Runs after the fuzz test (file order): reports what the 500 requests got."""
    total = sum(SEEN.values())
    print(f"fuzz: {total} requests, statuses {dict(SEEN)}")
    assert total >= 500 and SEEN["OK"] >= 25 and SEEN["INVALID_ARGUMENT"] >= 25
    assert health_status(live.channel) == serving()
    assert live.generate("abc", adapters=["senti@prod"], max_new_tokens=2).completion_tokens == 2
