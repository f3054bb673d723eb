"""Training and serving against a registry in a bucket (a moto S3 server on 127.0.0.1): a trainer
publishes there, a server reads it through its own read cache (never writing the bucket) and
answers token for token like a server on a directory registry; a moved tag is served at once."""

from __future__ import annotations

import contextlib

from objectstore_helpers import s3_env, s3_server  # noqa: F401
from serve_helpers import chat, scaled_copy, train_lora

from adapterhub.registry import RegistryLocation, open_registry
from adapterhub.serve.client import Client


def test_train_publishes_to_a_bucket_named_by_options_only(tiny_base_dir, s3_server, tmp_path, monkeypatch):
    from adapterhub.cli import main
    from adapterhub.tasks import write_split

    for key in ("AWS_ENDPOINT", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        if key.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_REGION", "AWS_DEFAULT")):
            monkeypatch.setenv(key, value)
    data, _ = write_split("sentiment", tmp_path / "data", n_train=16, n_test=2)
    url = f"s3://{s3_server.new_bucket()}/team"
    options = ["--registry-option", f"endpoint={s3_server.endpoint}", "--registry-option", "allow_http=true"]
    code = main(["train", "--plugin", "lora", "--base", str(tiny_base_dir), "--data", str(data), "--task", "senti",
                 "--registry", url, *options, "--max-steps", "2", "--batch-size", "8", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    store = open_registry(url, options={"endpoint": s3_server.endpoint, "allow_http": "true"},
                          cache_dir=tmp_path / "cache")
    assert store.list_versions("senti") == [1] and store.verify() == []
    assert (store.materialize("senti@1") / "adapter_model.safetensors").is_file()


@contextlib.contextmanager
def _server(base_dir, registry):
    from adapterhub.serve.server import AdapterServer, ServerOptions

    server = AdapterServer(ServerOptions(base=str(base_dir), registry=registry, quantize="none", port=0,
                                         max_adapters=4, max_new_tokens=16)).start()
    try:
        yield server
    finally:
        server.stop(grace=2)


def test_a_server_on_a_bucket_answers_like_one_on_a_directory(tiny_base_dir, tiny_tokenizer, s3_env, tmp_path):
    lora = train_lora(tiny_base_dir, tiny_tokenizer, tmp_path, "sentiment")
    louder = scaled_copy(tiny_base_dir, lora, tmp_path / "louder", 3.0)
    url = f"s3://{s3_env.new_bucket()}/adapters"
    bucket, directory = open_registry(url), open_registry(tmp_path / "registry")
    for store in (bucket, directory):
        store.publish("senti", lora)
        store.publish("senti", louder)
        store.set_tag("senti@1", "prod")
    before = sorted((e.path, e.size, e.modified) for e in bucket.bucket.list(""))
    messages = chat("a wonderful, moving film")
    answers = {}
    location = RegistryLocation(url, cache_dir=str(tmp_path / "server-cache"))
    for name, registry in (("bucket", location), ("directory", str(tmp_path / "registry"))):
        with _server(tiny_base_dir, registry) as server, Client(f"127.0.0.1:{server.port}", timeout=120) as client:
            answers[name] = [list(client.generate(messages=messages, adapters=[ref], max_new_tokens=6).token_ids)
                             for ref in ("senti@1", "senti@2", "senti@prod")]
            if name == "bucket":
                bucket.set_tag("senti@2", "prod")  # a trainer moves the tag: the next request follows it
                moved = list(client.generate(messages=messages, adapters=["senti@prod"], max_new_tokens=6).token_ids)
                assert moved == answers["bucket"][1]
    assert answers["bucket"] == answers["directory"]
    assert answers["bucket"][0] != answers["bucket"][1], "the two versions should answer differently"
    bucket.set_tag("senti@1", "prod")
    after = sorted((e.path, e.size, e.modified) for e in bucket.bucket.list(""))
    changed = {p for p, *_ in set(after) ^ set(before)}
    assert changed == {"tasks/senti/refs/prod"}, "the server wrote to the bucket"
    assert len(list((tmp_path / "server-cache" / "versions").iterdir())) == 2

