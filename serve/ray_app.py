"""adapterhub on Ray Serve: N replicas of one engine each, behind one OpenAI HTTP ingress that routes
by adapter affinity.

- ``Replica``: one :class:`AdapterServer` built from the same :class:`ServerOptions` as
  ``adapterhub serve`` (no ports of its own). It answers through the HTTP door's own app, called in
  process (:mod:`asgi_relay`), so requests, errors and streams are exactly one server's. Its
  engine keeps its iteration-level mixed batching across every adapter it holds: Ray's
  ``@serve.batch`` would split a batch by model id, so it is not used.
- ``Ingress``: resolves a request's ``model`` to pinned versions and an immutable key
  (:mod:`affinity`) and sends it with ``multiplexed_model_id=key``, so Ray Serve's multiplexing
  routes it to a replica that already holds those weights. A moved tag makes a new key: no replica
  serves the old weights for it.
- A replica that dies: Ray Serve starts another. The ingress sends a request again while its
  client has seen nothing (a unary request, or a stream before its first byte); a stream cut
  mid-answer ends with the door's error event. Every wait is bounded by ``timeout_s``.
- Each replica counts affinity hits (every pinned version resident in its adapter cache when the
  request arrived) and misses: a Ray metric, and an :class:`AffinityLedger` actor that keeps the
  counts of replicas that died too (:func:`affinity_counts`).

HTTP only: Ray's gRPC proxy calls deployment methods with the request message and runs none of a
gRPC server's interceptors, health or reflection, so the gRPC door (its bearer-token and error
interceptors, Admin) would have to be written a second time against it.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's ``Request`` annotation at runtime, in
# the class Ray Serve pickles by value as it decorates it.

import asyncio
import dataclasses
import json
import logging
import os
import time
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from fastapi.sse import format_sse_event
from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError

from .adapter_source import AdapterSource
from . import affinity
from .affinity import BASE_ONLY, BODIES, Pinned, pin_body
from .asgi_relay import Head, relay, start_lifespan
from .errors import RequestTimeout, ShuttingDown
from .openai_errors import error_response
from .openai_responses import error_body
from .server import ServerOptions
from .status import public_message, status_for

log = logging.getLogger(__name__)

APP = "adapterhub"
LEDGER_NAMESPACE = "adapterhub"
ATTEMPTS = 3  # replicas a request may be sent to while its client has seen nothing
REPLICA_GONE = (RayActorError, WorkerCrashedError, ReplicaUnavailableError)
COUNTED = {"hit": "hits", "miss": "misses"}
HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


# -- the counts every replica reports ------------------------------------------------------------


@ray.remote(num_cpus=0)
class AffinityLedger:
    """Per replica: its pid, and how many requests found their adapters resident (hits) or not."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict[str, int]] = {}

    def hello(self, replica: str, pid: int) -> None:
        self.replicas.setdefault(replica, {"hits": 0, "misses": 0})["pid"] = pid

    def record(self, replica: str, outcome: str) -> None:
        self.replicas.setdefault(replica, {"hits": 0, "misses": 0, "pid": 0})[COUNTED[outcome]] += 1

    def counts(self) -> dict[str, dict[str, int]]:
        return self.replicas

    def reset(self) -> None:
        self.replicas = {}


def ledger(app_name: str = APP) -> Any:
    """The app's ledger actor, created by whoever asks first (it outlives the replicas it counts)."""
    return AffinityLedger.options(name=f"affinity-{app_name}", namespace=LEDGER_NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote()


def affinity_counts(app_name: str = APP) -> dict[str, dict[str, int]]:
    """``{replica id: {"hits", "misses", "pid"}}`` of every replica the app has had."""
    return ray.get(ledger(app_name).counts.remote(), timeout=30)


# -- replicas --------------------------------------------------------------------------------------


@serve.deployment(name="Replica", max_constructor_retry_count=3)
class Replica:
    def __init__(self, options: ServerOptions):
        from .malloc import limit_arenas
        from .server import AdapterServer

        limit_arenas()  # before the engine's threads start, as `adapterhub serve` does
        self.server = AdapterServer(options)
        self.app = self.server.http_app()
        self._started: asyncio.Future | None = None  # the door's lifespan startup, run once on the replica's loop
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.ledger = ledger(context.app_name)
        self.ledger.hello.remote(self.id, os.getpid())
        self.metric = serve.metrics.Counter("adapterhub_affinity_requests",
                                            description="Requests whose adapters were resident on arrival (hit) or not",
                                            tag_keys=("outcome",))

        async def load(key: str) -> tuple[str, ...]:  # a function: Ray keeps its LRU on the object it wraps
            return await self._load(key)

        # Ray's LRU of keys, as many as the engine holds adapters (a key is one or more of them); Ray
        # reports its keys to the routers. A key Ray drops stays in the engine until its own LRU needs
        # the slot: the hit counts below read the engine, what a request really finds.
        self._keys = serve.multiplexed(max_num_models_per_replica=options.max_adapters)(load)

    async def _load(self, key: str) -> tuple[str, ...]:
        refs = affinity.LOADING.get()
        loop = asyncio.get_running_loop()
        for ref in refs:
            await loop.run_in_executor(None, self.server.engine.cache.load, ref)
        return refs

    def _resident(self, refs: tuple[str, ...]) -> bool:
        held = {entry.key for entry in self.server.engine.cache.snapshot()}
        return all(ref in held for ref in refs)

    async def forward(self, refs: tuple[str, ...], key: str, method: str, path: str, query: bytes,
                      headers: list[tuple[str, str]], body: bytes) -> AsyncIterator[Head | bytes]:
        """The door's answer to one request: a :class:`Head`, then body chunks."""
        if self._started is None:
            self._started = asyncio.ensure_future(start_lifespan(self.app))
        await asyncio.shield(self._started)  # a request cancelled meanwhile must not cancel the startup
        tags: tuple[tuple[str, str], ...] = (("x-adapterhub-replica", self.id),)
        if key:
            outcome = "hit" if self._resident(refs) else "miss"
            self.metric.inc(tags={"outcome": outcome})
            self.ledger.record.remote(self.id, outcome)
            tags += (("x-adapterhub-affinity", outcome),)
            affinity.LOADING.set(refs)
            try:
                await self._keys(key)
            except Exception:  # noqa: BLE001 - the door meets the same error below and answers it
                pass
        async for item in relay(self.app, method, path, query, headers, body):
            yield Head(item.status, item.headers + tags) if isinstance(item, Head) else item

    def base_names(self) -> tuple[str, ...]:
        """What ``model`` may say for the base alone (the door's own names)."""
        return (self.server.served_name, self.server.engine.base.name)

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(grace=2.0)


# -- the ingress (its helpers first: Ray Serve pickles the class as it is decorated) ----------------


async def within(step: Any, deadline: float) -> Any:
    return await asyncio.wait_for(step, max(0.0, deadline - time.monotonic()))


async def bounded(stream: Any, deadline: float) -> AsyncIterator[bytes]:
    while True:
        try:
            yield await within(stream.__anext__(), deadline)
        except StopAsyncIteration:
            return


async def rest(stream: Any, deadline: float) -> AsyncIterator[bytes]:
    """A stream's body after its head; cut short, it ends with the door's error event."""
    finished = False
    try:
        async for chunk in bounded(stream, deadline):
            yield chunk
        finished = True
    except REPLICA_GONE as exc:
        finished = True
        yield error_event(ShuttingDown(f"the replica serving this stream went away mid-answer ({type(exc).__name__}); "
                                       "the text so far is incomplete: send the request again"))
    except asyncio.TimeoutError:
        finished = True
        yield error_event(RequestTimeout("the stream stalled past the ingress's timeout"))
    finally:
        if not finished:  # the client went away: the replica's door frees the batch slot
            stream.cancel()


def passed(head: Head) -> dict[str, str]:
    return {k: v for k, v in head.headers if k.lower() not in HOP_HEADERS}


def error_event(exc: Exception) -> bytes:
    """The door's last event of a stream that failed after its 200 went out (its shape, its statuses)."""
    status = status_for(exc)
    body = error_body(public_message(exc, status), status.kind, code=status.name.lower())
    return format_sse_event(data_str=json.dumps(body, ensure_ascii=False, separators=(",", ":")))


app = FastAPI(title="adapterhub on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="Ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, replicas: Any, registry: Any, timeout_s: float):
        self.replicas = replicas
        self.source = AdapterSource(registry)
        self.timeout_s = timeout_s
        self.affinity = True
        self._base_names: tuple[str, ...] | None = None

    def reconfigure(self, config: dict) -> None:
        """``user_config``: ``{"affinity": false}`` routes without multiplexing (the baseline)."""
        self.affinity = bool(config.get("affinity", True))

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def route(self, request: Request) -> Response:
        path, body = request.url.path, await request.body()
        pinned = BASE_ONLY
        if request.method == "POST" and path in BODIES:
            try:
                body, pinned = await run_in_threadpool(pin_body, path, body, await self.base_names(), self.source)
            except Exception:  # noqa: BLE001 - a refused body: the door answers it, in its own words
                log.debug("forwarding %s unpinned", path, exc_info=True)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        return await self.forward(pinned, request.method, path, request.url.query.encode(), headers, body)

    async def base_names(self) -> tuple[str, ...]:
        if self._base_names is None:
            self._base_names = tuple(await self.replicas.base_names.remote())
        return self._base_names

    async def forward(self, pinned: Pinned, *call: Any) -> Response:
        deadline = time.monotonic() + self.timeout_s
        handle = self.replicas.options(stream=True)
        if pinned.key and self.affinity:
            handle = self.replicas.options(stream=True, multiplexed_model_id=pinned.key)
        gone: BaseException | None = None
        for attempt in range(1, ATTEMPTS + 1):
            stream = handle.forward.remote(pinned.refs, pinned.key, *call)
            handed_off = False
            try:
                head = await within(stream.__anext__(), deadline)
                if head.streams:
                    handed_off = True
                    return StreamingResponse(rest(stream, deadline), status_code=head.status, headers=passed(head))
                body = b"".join([chunk async for chunk in bounded(stream, deadline)])
                return Response(body, status_code=head.status, headers=passed(head))
            except REPLICA_GONE as exc:  # the client has seen nothing: another replica may answer
                gone = exc
                log.warning("a replica went away before answering (attempt %d of %d): %s", attempt, ATTEMPTS, exc)
            except asyncio.TimeoutError:
                return error_response(RequestTimeout(f"no answer from a replica within {self.timeout_s:g} s"))
            finally:
                if not handed_off:
                    stream.cancel()
        return error_response(ShuttingDown(f"{ATTEMPTS} replicas went away before answering ({gone}); retry"))


# -- building and running --------------------------------------------------------------------------


def build(options: ServerOptions, *, replicas: int = 2, affinity: bool = True, replica_cpus: float = 1.0,
          timeout_s: float = 300.0) -> Any:
    """The application: ``replicas`` engines on ``options`` (their own ports off) behind the ingress."""
    engines = dataclasses.replace(options, port=0, http_port=None, metrics_port=None)
    replica = Replica.options(num_replicas=replicas, max_ongoing_requests=options.max_batch,
                              ray_actor_options={"num_cpus": replica_cpus}).bind(engines)
    return Ingress.options(user_config={"affinity": affinity}).bind(replica, options.registry, timeout_s)


def set_affinity(enabled: bool, app_name: str = APP) -> None:
    """Turn multiplexed routing on or off in the running ingress, without restarting a replica (a new
    ``user_config`` through ``serve.run`` would: Serve versions each deployment anew per run). For
    measurements (the app runs one ingress replica); ``serve deploy`` configs set ``user_config``."""
    serve.get_deployment_handle("Ingress", app_name).reconfigure.remote({"affinity": enabled}).result(timeout_s=30)


def deploy(options: ServerOptions, *, host: str, port: int, name: str = APP, **build_options: Any) -> None:
    """Start Serve's HTTP proxy on ``host:port`` (Ray must be initialised) and run the app; blocks
    until every replica has loaded its base."""
    serve.start(http_options={"host": host, "port": port})
    ray.get(ledger(name).reset.remote(), timeout=30)
    serve.run(build(options, **build_options), name=name, route_prefix="/")
