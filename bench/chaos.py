"""(m) Chaos: a real ``adapterhub serve`` under mixed load on both doors while things go wrong.

One server subprocess (tiny base, gRPC + ``--http-port``, ``--max-adapters 2`` under 7 adapter
versions, so the cache evicts all the time) takes ``CHAOS_REQUESTS`` requests (default 400) from
``CHAOS_CLIENTS`` threads (default 12): gRPC unary and streams (``adapterhub.serve.client.Client``),
HTTP chat and streamed completions (the ``openai`` client), greedy and seeded. Meanwhile it injects:

- poisoned rows: ``poison@1``, a LoRA whose ``lora_B`` is inf (NaN logits for its row only);
- client disconnects: a stream closed by the client after its first chunk;
- tag moves: ``adapterhub registry tag`` moves ``a0@prod`` between two versions every second;
- SIGTERM once ~40% of the requests are sent, then a restart on the same ports.

Every request ends in exactly one outcome. A refusal while the server stops or is down (gRPC
UNAVAILABLE, HTTP 503, connection refused) or a stream ended by the stop's final error is retried,
as the retry hint says, and counted. *Lost* is a request that got neither an answer nor an error (a
stream that just ends, a client timeout); *innocent* is a failure that is none of: poisoned, cut by
us, refused during the stop. Both must be 0. Greedy answers pinned to a version must also agree
with each other across doors' repeats (batch composition and evictions must not change tokens).
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import common

REQUESTS = int(os.environ.get("CHAOS_REQUESTS", "400"))
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "12"))
STOP_AT = 0.4  # SIGTERM once this share of the requests is sent
GRACE = 5
PROMPTS = ["the good day", "a bad movie", "dark cold room", "the food was fine", "open the door", "green river"]
MODELS = ["", "a0@1", "a1@1", "a2@1", "a3@1", "a0@prod"]
DOORS = ("grpc", "grpc-stream", "http-chat", "http-stream")
EVICTIONS = 'adapterhub_adapter_cache_total{event="evictions"}'
TINY = common.Shape("tiny", "tiny", "tiny random base (2 layers, byte tokenizer)")


class Refused(Exception):
    """Refused or ended by the stop (UNAVAILABLE / 503 / connection refused): retry as told."""


class Lost(Exception):
    """Neither an answer nor an error."""


class Server:
    """``adapterhub serve`` on fixed ports, so a restart is found where clients already look."""

    def __init__(self, base: Path, registry: Path, cache: Path, log: Path):
        self.grpc_port, self.http_port = common.free_port(), common.free_port()
        self.cmd = [sys.executable, "-m", "adapterhub", "serve", "--base", str(base), "--registry", str(registry),
                    "--cache-dir", str(cache), "--quantize", "none", "--port", str(self.grpc_port),
                    "--http-port", str(self.http_port), "--max-adapters", "2", "--max-batch", "8",
                    "--max-new-tokens", "64", "--grace", str(GRACE)]
        self.log, self.proc, self.exits = log, None, []

    def start(self) -> None:
        import httpx

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"server did not start; see {self.log}")

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("adapterhub_adapter_cache_total")}

    def terminate(self, wait: float = 60) -> float:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.exits.append(self.proc.wait(wait))
        return time.monotonic() - start


def build_registry(root: Path) -> tuple[Path, Path]:
    """The tiny base, a registry of a0..a3 (a0 twice, for the tag to move) and the poisoned one."""
    from safetensors.torch import load_file, save_file

    from adapterhub.registry import open_registry

    base = common.base_dir(TINY)
    adapters = common.lora_adapters(base, 5, TINY)
    store = open_registry(root / "registry")
    for i in range(4):
        store.publish(f"a{i}", adapters[i])
    store.publish("a0", adapters[4])  # a0@2: what the tag moves to and back
    store.set_tag("a0@1", "prod")
    poison = root / "poison"
    shutil.copytree(adapters[0], poison)
    weights = poison / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * float("inf") if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    store.publish("poison", poison)
    return base, root / "registry"


def plan(n: int) -> list[dict]:
    rng = random.Random(32)
    jobs = []
    for i in range(n):
        door = DOORS[i % len(DOORS)]
        job = {"i": i, "door": door, "prompt": rng.choice(PROMPTS), "model": rng.choice(MODELS),
               "max": rng.choice([8, 16, 32]), "temperature": 0.0, "seed": 0, "poison": False, "disconnect": False}
        if rng.random() < 0.2:
            job.update(temperature=0.8, seed=rng.randrange(1000))
        if rng.random() < 0.06:
            job.update(model="poison@1", poison=True)
        elif door.endswith("stream") and rng.random() < 0.15:
            job.update(disconnect=True, max=48)
        jobs.append(job)
    return jobs


def grpc_once(client, job) -> tuple[str, str]:
    """(outcome, text) of one gRPC attempt; raises Refused / Lost / the error."""
    import grpc

    kwargs = dict(adapters=[job["model"]] if job["model"] else [], max_new_tokens=job["max"],
                  temperature=job["temperature"], seed=job["seed"])
    try:
        if job["door"] == "grpc":
            reply = client.generate(job["prompt"], **kwargs)
            return "answered", reply.text
        stream = client.stream(job["prompt"], **kwargs)
        text = ""
        for chunk in stream:
            if job["disconnect"]:
                stream.cancel()
                return "disconnected", ""
            text += chunk.text
            if chunk.finish_reason:
                return "answered", text
        raise Lost("gRPC stream ended without a finish_reason or a status")
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and job["disconnect"]:
            return "disconnected", ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise Refused(f"grpc UNAVAILABLE: {exc.details()}") from exc
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise Lost("gRPC deadline exceeded") from exc
        raise RuntimeError(f"grpc {exc.code().name}: {exc.details()}") from exc


def http_once(client, job, base_name: str) -> tuple[str, str]:
    import httpx
    import openai

    model = job["model"] or base_name
    extra = {"seed": job["seed"]} if job["temperature"] else {}
    try:
        if job["door"] == "http-chat":
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": job["prompt"]}],
                                                   max_tokens=job["max"], temperature=job["temperature"], **extra)
            return "answered", reply.choices[0].message.content
        stream = client.completions.create(model=model, prompt=job["prompt"], max_tokens=job["max"],
                                           temperature=job["temperature"], stream=True, **extra)
        text, finished = "", False
        for chunk in stream:
            if job["disconnect"]:
                stream.close()
                return "disconnected", ""
            if chunk.choices:
                text += chunk.choices[0].text
                finished = finished or bool(chunk.choices[0].finish_reason)
        if finished:
            return "answered", text
        raise Lost("SSE stream ended without a finish_reason or an error event")
    except openai.APIStatusError as exc:
        if exc.status_code == 503:
            raise Refused(f"http 503: {exc.message}") from exc
        raise RuntimeError(f"http {exc.status_code}: {exc.message}") from exc
    except openai.APIConnectionError as exc:
        if isinstance(exc, openai.APITimeoutError):
            raise Lost("HTTP client timeout") from exc
        raise Refused(f"http connection refused: {exc}") from exc
    except openai.APIError as exc:  # an SSE error event
        body = exc.body if isinstance(exc.body, dict) else {}
        if body.get("code") == "unavailable" or "unavailable" in str(exc.message):
            raise Refused(f"http stream ended by the stop: {exc.message}") from exc
        raise RuntimeError(f"http stream error event: {exc.message}") from exc
    except httpx.TransportError as exc:
        raise RuntimeError(f"http stream cut without an error event: {exc!r}") from exc


def run_job(job, clients, tally, stopping: threading.Event, base_name: str) -> dict:
    """Attempts until an outcome: a request refused while the server stops or is down is retried
    (for up to 120 s); a refusal of a request that never met the stop is a failure."""
    deadline, in_stop = time.monotonic() + 120, False
    grpc_client, http_client = clients()
    while True:
        try:
            if job["door"].startswith("grpc"):
                outcome, text = grpc_once(grpc_client, job)
            else:
                outcome, text = http_once(http_client, job, base_name)
            return {**job, "outcome": outcome, "text": text}
        except Refused as exc:
            tally["attempts refused during the stop (retried)"] += 1
            if not in_stop:
                tally["requests refused during the stop"] += 1
            if "stopped before" in str(exc):
                tally["streams ended by the stop's final error"] += 1
            # once refused by the stop, a request keeps retrying past the restart: a gRPC channel
            # that saw the port closed waits out its reconnect backoff (up to seconds) first
            in_stop = in_stop or stopping.is_set()
            if not in_stop or time.monotonic() > deadline:
                return {**job, "outcome": "failed", "cause": f"refused outside the stop: {exc}"[:160]}
            time.sleep(0.3)
        except Lost as exc:
            return {**job, "outcome": "lost", "cause": str(exc)}
        except Exception as exc:  # noqa: BLE001 - every other failure is a result to count, not a crash
            return {**job, "outcome": "failed", "cause": str(exc)[:300]}


def cause_of(result: dict) -> str:
    if result["poison"]:
        return "poisoned (not finite)" if "not finite" in result["cause"] else \
            "poisoned, other: " + result["cause"].split(":")[0][:60]
    return "innocent: " + result["cause"].split(":")[0][:60]


def main() -> dict:
    import openai

    from adapterhub.serve.client import Client

    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    log = root / "server.log"
    try:
        base, registry = build_registry(root)
        server = Server(base, registry, root / "cache", log)
        server.start()
        base_name = base.name
        local = threading.local()

        def clients():
            if not hasattr(local, "grpc"):
                local.grpc = Client(f"127.0.0.1:{server.grpc_port}", timeout=60)
                local.http = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none",
                                           max_retries=0, timeout=60)
            return local.grpc, local.http

        jobs, tally, stopping, done = plan(REQUESTS), collections.Counter(), threading.Event(), threading.Event()
        sent = [0]

        def mover():
            target = 2
            while not done.wait(1.0):
                subprocess.run([sys.executable, "-m", "adapterhub", "registry", "tag", f"a0@{target}", "prod",
                                "--registry", str(registry)], check=True, capture_output=True)
                tally["tag moves"] += 1
                target = 3 - target

        def stopper():
            while sent[0] < STOP_AT * len(jobs):
                time.sleep(0.05)
            stopping.set()
            tally["evictions before the stop"] = int(server.metrics().get(
                EVICTIONS, 0))
            stop_s = server.terminate()
            server.start()
            tally["restarts"] += 1
            time.sleep(3)  # retries still in flight count as refused during the stop
            stopping.clear()
            print(f"SIGTERM: the server exited {server.exits[-1]} in {stop_s:.1f} s; restarted", flush=True)

        def send(job):
            sent[0] += 1
            return run_job(job, clients, tally, stopping, base_name)

        background = [threading.Thread(target=mover, daemon=True), threading.Thread(target=stopper, daemon=True)]
        for t in background:
            t.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(send, jobs))
        elapsed = time.perf_counter() - start
        done.set()
        background[1].join(60)
        tally["evictions after the restart"] = int(server.metrics().get(
            EVICTIONS, 0))
        server.terminate()
    finally:
        log_text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
    return report(results, tally, elapsed, server.exits, log_text)


def report(results, tally, elapsed, exits, log_text) -> dict:
    outcomes = collections.Counter(r["outcome"] for r in results)
    stops = [line for line in log_text.splitlines() if line.startswith("stopped on")]
    failed = collections.Counter(cause_of(r) for r in results if r["outcome"] == "failed")
    innocent = sum(n for cause, n in failed.items() if cause.startswith("innocent"))
    answers = collections.defaultdict(set)
    for r in results:
        if r["outcome"] == "answered" and r["temperature"] == 0 and not r["model"].endswith("prod"):
            answers[(r["model"], r["prompt"], r["max"], r["door"] == "http-chat")].add(r["text"])
    disagree = sum(len(texts) > 1 for texts in answers.values())
    poison_answered = sum(r["poison"] and r["outcome"] == "answered" for r in results)
    rows = [["sent", len(results)], ["answered", outcomes["answered"]], ["disconnected by us", outcomes["disconnected"]],
            *[[f"failed: {cause}", n] for cause, n in sorted(failed.items())], ["lost", outcomes["lost"]],
            ["innocent failures", innocent], ["poisoned but answered", poison_answered],
            *[[k, v] for k, v in sorted(tally.items())], ["greedy answers that disagree", disagree],
            ["server exit codes", " ".join(map(str, exits))], *[["server's stop line", line] for line in stops], ["tracebacks in the server log", log_text.count("Traceback")]]
    print(common.table(["chaos", "count"], rows))
    for r in results:
        if r["outcome"] == "lost" or (r["outcome"] == "failed" and not r["poison"]):
            print(f"  {r['outcome']}: request {r['i']} {r['door']} {r['model'] or 'base'}: {r.get('cause')}")
    results_out = {"requests": len(results), "clients": CLIENTS, "elapsed_s": elapsed,
                   "outcomes": dict(outcomes), "failed_by_cause": dict(failed), "innocent_failures": innocent,
                   "lost": outcomes["lost"], "poisoned_but_answered": poison_answered, "events": dict(tally),
                   "greedy_keys": len(answers), "greedy_disagree": disagree, "server_exits": exits, "server_stop_lines": stops,
                   "server_log_tracebacks": log_text.count("Traceback"), "server_log_tail": log_text[-2000:],
                   "targets": [common.verdict("lost requests", outcomes["lost"], "<=", 0),
                               common.verdict("innocent failures", innocent, "<=", 0)]}
    common.save("chaos", results_out)
    return results_out


if __name__ == "__main__":
    main()
