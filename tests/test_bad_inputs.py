"""The bad-input matrix: every row is a bad input that must get a clear, one-line, non-crashing refusal.

CLI rows run ``python -m adapterhub`` for real (non-zero exit, one ``error:`` line naming the thing,
no traceback); loader and registry rows call the library (an AdapterHubError naming the thing);
server rows send a request (the right status with a message naming the field). Afterwards the
registry and the output directories must be exactly as before: nothing written, nothing corrupted.

max_new_tokens=0 means the server default (min(64, --max-new-tokens)), as the proto documents; it
is not an error and is checked as such at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from serve_helpers import running_server, train_lora, tree_state

from adapterhub.errors import AdapterHubError
from adapterhub.serve.client import Client

CODE = grpc.StatusCode
LONG = "n" * 10_000


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    from adapterhub.registry import open_registry

    root = tmp_path_factory.mktemp("badinputs")
    lora = train_lora(tiny_base_dir, tiny_tokenizer, root, "sentiment", steps=4)
    store = open_registry(root / "registry")
    store.publish("senti", lora)
    store.publish("senti", lora)
    store.set_tag("senti@1", "prod")
    data = root / "data"
    data.mkdir()
    good = '{"instruction": "hi", "output": "yo"}\n'
    files = {
        "malformed.jsonl": good + '{"instruction": "hi", "output": \n',
        "empty.jsonl": "",
        "blank.jsonl": "\n\n  \n",
        "hugeline.jsonl": good + '{"instruction": "' + "x" * (1 << 20) + '", "output": "y"}\n',
        "wrongtype.jsonl": '{"instruction": "hi", "output": 5}\n',
        "notobject.jsonl": "[1, 2, 3]\n",
        "badrole.jsonl": '{"messages": [{"role": "robot", "content": "x"}]}\n',
        "nooutput.jsonl": '{"instruction": "hi"}\n',
        "messagesnotlist.jsonl": '{"messages": "hello"}\n',
        "good.jsonl": good,
    }
    for name, text in files.items():
        (data / name).write_text(text)
    (data / "notutf8.jsonl").write_bytes(b'{"instruction": "\xff\xfe", "output": "y"}\n')
    # adapter directories that must not be published
    bad = root / "bad"
    for name in ("pickle", "truncated", "nometa", "empty"):
        (bad / name).mkdir(parents=True)
    for name in ("pickle", "truncated"):
        shutil.copy(lora / "adapter_config.json", bad / name)
        shutil.copy(lora / "adapterhub.json", bad / name)
    (bad / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    (bad / "truncated" / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes()[:50])
    shutil.copy(lora / "adapter_model.safetensors", bad / "nometa")
    # a second registry whose only manifest points at a missing blob
    broken = open_registry(root / "broken-registry")
    broken.publish("gone", lora)
    for blob in (broken.root / "blobs").iterdir():
        os.chmod(blob, 0o644)
        blob.unlink()
    # a base whose MLP width bitsandbytes cannot quantize (row length 100, not a multiple of 64)
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = root / "oddbase"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=100, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=300)).save_pretrained(odd)
    shutil.copy(tiny_base_dir / "tokenizer.json", odd) if (tiny_base_dir / "tokenizer.json").exists() else None
    return {"root": root, "store": store, "data": data, "bad": bad, "lora": lora, "broken": broken.root, "odd": odd}


def cli_cases(e, base):
    reg = ["--registry", str(e["root"] / "registry")]
    out = str(e["root"] / "out-never")
    train = ["train", "--plugin", "lora", "--base", str(base), "--task", "t", "--output", out, *reg, "--max-steps", "1"]
    d = e["data"]
    return [
        ("unknown plugin", ["train", "--plugin", "nosuch", "--base", str(base), "--data", str(d / "empty.jsonl"),
                            "--task", "t", *reg], "unknown method plugin 'nosuch'"),
        ("bad method config value", [*train, "--data", str(d / "nooutput.jsonl"), "--set", "r=abc"], "r"),
        ("unknown method config key", [*train, "--data", str(d / "nooutput.jsonl"), "--set", "nosuchkey=1"], "nosuchkey"),
        ("malformed JSONL", [*train, "--data", str(d / "malformed.jsonl")], "malformed.jsonl:2"),
        ("empty data file", [*train, "--data", str(d / "empty.jsonl")], "no examples"),
        ("huge line", [*train, "--data", str(d / "hugeline.jsonl")], "hugeline.jsonl:2"),
        ("wrong field type", [*train, "--data", str(d / "wrongtype.jsonl")], "wrongtype.jsonl:1"),
        ("missing data file", [*train, "--data", str(d / "nosuch.jsonl")], "nosuch.jsonl"),
        # every data line is checked before the base is looked for: good data, so the base is what fails
        ("missing base", [*train[:4], str(e["root"] / "nobase"), *train[5:], "--data", str(d / "good.jsonl")],
         "nobase"),
        ("bad task name", ["train", "--plugin", "lora", "--base", str(base), "--task", "../x", "--data",
                           str(d / "empty.jsonl"), *reg], "../x"),
        ("registry ref ../x", ["registry", *reg, "show", "../x"], "../x"),
        ("registry ref a@", ["registry", *reg, "show", "a@"], "a@"),
        ("registry ref a@-1", ["registry", *reg, "show", "a@-1"], "-1"),
        ("registry 10 kB name", ["registry", *reg, "show", LONG], "10000 characters"),
        ("registry unknown version", ["registry", *reg, "show", "senti@99"], "senti@99"),
        ("registry numeric tag", ["registry", *reg, "tag", "senti@1", "123"], "numeric"),
        ("registry tag latest", ["registry", *reg, "tag", "senti@1", "latest"], "latest"),
        ("registry rm bare task", ["registry", *reg, "rm", "senti"], "senti"),
        ("registry rm tagged", ["registry", *reg, "rm", "senti@1"], "prod"),
        ("import pickle", ["registry", *reg, "import", str(e["bad"] / "pickle"), "--task", "p"], "pickle"),
        ("import truncated safetensors", ["registry", *reg, "import", str(e["bad"] / "truncated"), "--task", "p"],
         "safetensors"),
        ("import missing dir", ["registry", *reg, "import", str(e["bad"] / "nosuch"), "--task", "p"], "nosuch"),
        ("verify missing blob", ["registry", "--registry", str(e["broken"]), "verify"], "gone@1"),
        ("load missing blob", ["registry", "--registry", str(e["broken"]), "export", "gone@1", "--out", out], "missing blob"),
        ("serve missing base", ["serve", "--base", str(e["root"] / "nobase"), *reg, "--port", "0"], "nobase"),
        ("serve unset token env", ["serve", "--base", str(base), *reg, "--token-env", "ADAPTERHUB_UNSET_XYZ"],
         "ADAPTERHUB_UNSET_XYZ"),
    ]


def _run_cli(args):
    env = {**os.environ, "ADAPTERHUB_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("ADAPTERHUB_UNSET_XYZ", None)
    return subprocess.run([sys.executable, "-m", "adapterhub", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def library_cases(e, base, tokenizer):
    from adapterhub.base import load_base
    from adapterhub.data import load_dataset

    store, d, bad = e["store"], e["data"], e["bad"]
    rows = [(f"data {n}", (lambda n=n: load_dataset(d / n, tokenizer)), n)
            for n in ("malformed.jsonl", "empty.jsonl", "blank.jsonl", "hugeline.jsonl", "wrongtype.jsonl",
                      "notobject.jsonl", "badrole.jsonl", "nooutput.jsonl", "messagesnotlist.jsonl", "notutf8.jsonl")]
    rows += [
        ("publish pickle", lambda: store.publish("p", bad / "pickle"), "pickle"),
        ("publish truncated safetensors", lambda: store.publish("p", bad / "truncated"), "not a valid safetensors"),
        ("publish without adapterhub.json", lambda: store.publish("p", bad / "nometa"), "adapterhub.json"),
        ("publish empty dir", lambda: store.publish("p", bad / "empty"), "no adapter files"),
        ("publish task ../x", lambda: store.publish("../x", e["lora"]), "../x"),
        ("publish task 10 kB", lambda: store.publish(LONG, e["lora"]), "10000 characters"),
        ("tag unknown version", lambda: store.set_tag("senti@99", "prod"), "senti@99"),
        ("tag bad name", lambda: store.set_tag("senti@1", "a/b"), "a/b"),
        ("base nf4 with odd widths", lambda: load_base(e["odd"], "nf4"), "64"),
    ]
    return rows


SERVER_CASES = [
    ("ref ../x", dict(adapters=["../x"]), CODE.INVALID_ARGUMENT, "../x"),
    ("ref a@", dict(adapters=["a@"]), CODE.INVALID_ARGUMENT, "a@"),
    ("ref a@-1", dict(adapters=["a@-1"]), CODE.INVALID_ARGUMENT, "-1"),
    ("ref 10 kB", dict(adapters=[LONG]), CODE.INVALID_ARGUMENT, "10000 characters"),
    ("unknown task", dict(adapters=["nosuch"]), CODE.NOT_FOUND, "nosuch"),
    ("unknown tag", dict(adapters=["senti@canary"]), CODE.NOT_FOUND, "canary"),
    ("prompt over context", dict(prompt="word " * 200), CODE.INVALID_ARGUMENT, "context length"),
    ("max_new_tokens 10^9", dict(max_new_tokens=10**9), CODE.INVALID_ARGUMENT, "max_new_tokens"),
    ("negative temperature", dict(temperature=-0.5), CODE.INVALID_ARGUMENT, "temperature"),
    ("NaN weight", dict(adapters=[("senti@1", float("nan"))]), CODE.INVALID_ARGUMENT, "weight"),
    ("inf weight", dict(adapters=[("senti@1", float("inf"))]), CODE.INVALID_ARGUMENT, "weight"),
    ("too many adapters", dict(adapters=["senti@1", "senti@2", "senti@prod"]), CODE.INVALID_ARGUMENT,
     "--max-adapters-per-request"),
    ("empty prompt", dict(prompt=""), CODE.INVALID_ARGUMENT, "empty"),
    ("unknown chat role", dict(prompt=None, messages=[("robot", "hi")]), CODE.INVALID_ARGUMENT, "robot"),
    ("top_p over 1", dict(top_p=1.5), CODE.INVALID_ARGUMENT, "top_p"),
    ("11 stop strings", dict(stop=["x"] * 11), CODE.INVALID_ARGUMENT, "stop"),
]


def test_bad_input_matrix(env, tiny_base_dir, tiny_tokenizer):
    watched = [env["root"] / "registry", env["broken"], env["bad"], env["data"]]
    before = {str(p): tree_state(p) for p in watched}
    outcomes = {"cli": 0, "library": 0, "server": 0}

    cli = cli_cases(env, tiny_base_dir)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run_cli, [args for _, args, _ in cli]))
    for (label, args, words), proc in zip(cli, results):
        err = proc.stderr.strip()
        assert proc.returncode != 0, (label, proc.stdout, err)
        assert "Traceback" not in err, (label, err)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        if label.startswith("verify"):  # verify reports problems on stdout, one per line, and exits 1
            lines = [line for line in proc.stdout.splitlines() if words in line]
            assert proc.returncode == 1 and lines, (label, proc.stdout)
        else:
            assert len(lines) == 1 and words in lines[0], (label, err[-600:])
        outcomes["cli"] += 1
    assert not (env["root"] / "out-never").exists()

    for label, call, words in library_cases(env, tiny_base_dir, tiny_tokenizer):
        with pytest.raises(AdapterHubError) as exc:
            call()
        message = str(exc.value)
        assert words in message and "\n" not in message and len(message) < 800, (label, message)
        outcomes["library"] += 1

    with running_server(tiny_base_dir, env["root"] / "registry", max_adapters_per_request=2, max_new_tokens=16) as srv, \
            Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
        for label, kwargs, code, words in SERVER_CASES:
            request = {"prompt": "abc", "max_new_tokens": 2, **kwargs}
            with pytest.raises(grpc.RpcError) as exc:
                client.generate(**request)
            assert exc.value.code() == code and words in exc.value.details(), (label, exc.value.code(),
                                                                              exc.value.details())
            assert "\n" not in exc.value.details()
            outcomes["server"] += 1
        default = client.generate("abc", max_new_tokens=0)  # 0 = the server default, min(64, limit 16)
        assert default.completion_tokens == 16 or default.finish_reason == "eos"

    after = {str(p): tree_state(p) for p in watched}
    assert after == before, "a refused input wrote to or changed the registry or inputs"
    total = sum(outcomes.values())
    print(f"bad inputs refused cleanly: {total} ({outcomes}); registry and inputs unchanged")
    assert total >= 40


def test_taken_ports_and_bad_weights_fail_fast(env, tiny_base_dir):
    """A second server on a taken port exits 2 with one line (gRPC's default SO_REUSEPORT let it start
    and take half the first one's requests); so does a taken --metrics-port (it printed a traceback)
    or --http-port, and a weight that is no number is named as the weight (it was reported as a bad tag)."""
    import socket

    registry = env["root"] / "registry"
    serve = ["serve", "--base", str(tiny_base_dir), "--registry", str(registry), "--quantize", "none"]
    with running_server(tiny_base_dir, registry, http_port=0) as server, socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        cases = [
            ([*serve, "--port", str(server.port)], f"--port {server.port}", "already in use"),
            ([*serve, "--port", "0", "--metrics-port", str(taken)], f"--metrics-port {taken}", "already in use"),
            ([*serve, "--port", "0", "--http-port", str(server.http_port)], f"--http-port {server.http_port}",
             "already in use"),
            (["generate", "--server", f"127.0.0.1:{server.port}", "--adapter", "senti@2:abc", "hi"], "'abc'",
             "not a number"),
        ]
        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(_run_cli, [args for args, *_ in cases]))
        for (args, *words), proc in zip(cases, results):
            err = proc.stderr.strip()
            assert proc.returncode == 2 and "Traceback" not in err, (args, proc.returncode, err[-600:])
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and all(w in lines[0] for w in words), (args, err[-600:])
        with Client(f"127.0.0.1:{server.port}") as client:  # the first server still answers every request
            assert all(client.generate("hi", adapters=["senti@1"], max_new_tokens=2).token_ids for _ in range(4))
