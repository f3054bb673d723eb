"""Graceful stop (issue 32): real signals to a real ``adapterhub serve`` with streams on both doors.

On SIGTERM or SIGINT the server keeps answering health with 503 / NOT_SERVING, refuses new requests
with UNAVAILABLE / 503 and a retry hint, lets the streams in flight finish within ``--grace`` and
ends the rest with a final error (an SSE error event, a gRPC status), then exits 0 with one summary
line and nothing else worth reading: no traceback, no leak report. A second signal stops at once.

``--max-batch 2`` queues the long requests behind each other, so the last ones cannot finish
within the grace however fast the machine is, while two short streams admitted first do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from serve_helpers import health_status

from adapterhub.serve.client import Client

LONG = 480  # "abc" on the tiny base runs to its limit (no EOS): about 1 s a pair on an idle core


class Served:
    """``adapterhub serve`` in a subprocess; stderr is read as it comes (a full pipe would block it)."""

    def __init__(self, base, registry, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapterhub", "serve", "--base", str(base), "--registry", str(registry),
             "--port", "0", "--http-port", "0", "--quantize", "none", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        first = self.proc.stdout.readline()
        assert first.startswith("serving on "), "".join(self.err) if self.proc.poll() is not None else first
        self.grpc = first.split()[-1]
        self.http = self.proc.stdout.readline().split()[4].removesuffix("/v1")

    def finish(self, timeout: float = 60) -> tuple[int, list[str]]:
        out, _ = self.proc.communicate(timeout=timeout)
        time.sleep(0.2)  # the stderr reader's last lines
        return self.proc.returncode, [line for line in out.splitlines() if line]


def http_stream(base: str, max_tokens: int, events: list, started: threading.Event | None = None) -> None:
    """The stream's events (parsed), or the transport error if the connection was cut; ``started`` is
    set once the server took the request (the headers come after the engine queued it)."""
    body = {"model": "tiny", "prompt": "abc", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200, response.read()
            if started is not None:
                started.set()
            for line in response.iter_lines():
                if line:
                    events.append("[DONE]" if line == "data: [DONE]" else json.loads(line.removeprefix("data: ")))
    except httpx.TransportError as exc:
        events.append(exc)


def grpc_stream(target: str, max_tokens: int, out: list, started: threading.Event | None = None) -> None:
    with Client(target, timeout=120) as client:
        try:
            for chunk in client.stream("abc", max_new_tokens=max_tokens):
                out.append(chunk)
                if started is not None:
                    started.set()
        except grpc.RpcError as exc:
            out.append(exc)


def _spawn(target, *args) -> tuple[list, threading.Event, threading.Thread]:
    out, started = [], threading.Event()
    thread = threading.Thread(target=target, args=(*args, out, started))
    thread.start()
    return out, started, thread


def _ended_by_shutdown(events: list) -> bool:
    last = events[-1]
    if isinstance(last, grpc.RpcError):
        return last.code() == grpc.StatusCode.UNAVAILABLE and "server stopped before request" in last.details()
    return isinstance(last, dict) and last.get("error", {}).get("code") == "unavailable" \
        and "server stopped before request" in last["error"]["message"]


def _finished(events: list) -> bool:
    last = events[-1]
    return last == "[DONE]" or (hasattr(last, "finish_reason") and last.finish_reason == "length")


def _clean(stderr: list[str]) -> None:
    text = "".join(stderr)
    for needle in ("Traceback", "leaked", "disconnected", "Exception", "ERROR"):
        assert needle not in text, f"{needle!r} in the server's stderr:\n{text[-3000:]}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    path = tmp_path_factory.mktemp("stop") / "registry"
    path.mkdir()
    return path


def test_sigterm_finishes_streams_within_grace_ends_the_rest_and_exits_0(tiny_base_dir, registry):
    server = Served(tiny_base_dir, registry, "--max-batch", "2", "--grace", "2")
    try:
        short = [_spawn(grpc_stream, server.grpc, 60), _spawn(http_stream, server.http, 60)]
        for _, started, _ in short:
            assert started.wait(60)
        queued = [_spawn(http_stream, server.http, LONG), _spawn(grpc_stream, server.grpc, LONG),
                  _spawn(http_stream, server.http, LONG), _spawn(grpc_stream, server.grpc, LONG),
                  _spawn(http_stream, server.http, LONG), _spawn(grpc_stream, server.grpc, LONG)]
        for events, started, _ in queued[::2]:
            assert started.wait(60)
        time.sleep(0.05)  # the gRPC ones, sent beside them
        server.proc.send_signal(signal.SIGTERM)

        health = httpx.get(f"{server.http}/health", timeout=10)
        for _ in range(100):  # the signal is handled within a poll interval
            if health.status_code == 503:
                break
            time.sleep(0.02)
            health = httpx.get(f"{server.http}/health", timeout=10)
        assert health.status_code == 503 and health.json() == {"status": "NOT_SERVING"}
        with Client(server.grpc, timeout=30) as client:
            from grpc_health.v1 import health_pb2

            assert health_status(client.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                client.generate("abc", max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in refused.value.details()
        late = httpx.post(f"{server.http}/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2},
                          timeout=30)
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert late.json()["error"]["code"] == "unavailable" and "retry" in late.json()["error"]["message"]

        for _, _, thread in short + queued:
            thread.join(120)
        code, stdout = server.finish()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    for events, _, _ in short:
        assert _finished(events), f"a stream that could finish within --grace did not: {events[-2:]}"
    ended = [events for events, _, _ in queued if not _finished(events)]
    assert ended, "every long request finished: the test did not exercise the end of the grace"
    for events in ended:
        assert _ended_by_shutdown(events), f"a stream was cut without a final error: {events[-1]!r}"
    assert code == 0
    assert len(stdout) == 1, stdout  # after the two "serving on" lines: the summary, one line
    assert re.fullmatch(rf"stopped on SIGTERM: \d+ request\(s\) in flight finished, {len(ended)} ended when the 2 s grace "
                        r"ran out \(each with a final error\)", stdout[0]), stdout
    _clean(server.err)
    print(stdout[-1])


def test_a_second_signal_stops_at_once(tiny_base_dir, registry):
    server = Served(tiny_base_dir, registry, "--max-batch", "1", "--grace", "600")
    try:
        streams = [_spawn(http_stream, server.http, LONG), _spawn(grpc_stream, server.grpc, LONG),
                   _spawn(http_stream, server.http, LONG)]
        assert streams[0][1].wait(60)
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert server.proc.poll() is None, "the first signal must wait for the streams (grace 600 s)"
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        code, stdout = server.finish(timeout=30)
        took = time.monotonic() - stopped
        for _, _, thread in streams:
            thread.join(60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert code == 0 and took < 10, (code, took)
    assert stdout[-1].startswith("stopped on SIGINT: ") and "by a second signal" in stdout[-1], stdout
    for events, _, _ in streams:
        assert _finished(events) or _ended_by_shutdown(events), events[-1]
    assert any(_ended_by_shutdown(events) for events, _, _ in streams)
    _clean(server.err)


def test_an_idle_server_stops_at_once_on_sigterm(tiny_base_dir, registry):
    server = Served(tiny_base_dir, registry, "--grace", "30")
    with Client(server.grpc, timeout=60) as client:
        assert client.generate("abc", max_new_tokens=2).completion_tokens == 2
    stopped = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code, stdout = server.finish(timeout=30)
    assert code == 0 and time.monotonic() - stopped < 10, "nothing in flight: the grace is not waited for"
    assert stdout == ["stopped on SIGTERM: 0 request(s) in flight finished within the 30 s grace"]
    _clean(server.err)
