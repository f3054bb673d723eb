"""Assemble and run the server: engine, gRPC servicers, interceptors, health, reflection, metrics, and the
optional OpenAI HTTP API on the same engine."""

from __future__ import annotations

import gc
import logging
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapterhub.base import load_base, resolve_device

from ._proto import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from . import lora_backends
from .adapter_source import AdapterSource
from .auth import Tokens
from .engine import Engine
from .interceptors import BearerTokenInterceptor, ErrorInterceptor
from .metrics import Metrics
from .options import ServerOptions, lora_dtype, lora_overlap, torch_threads
from .ports import check_free, in_use
from .servicers import AdminServicer, InferenceServicer
from .signals import StopSignals, summary

__all__ = ["AdapterServer", "ServerOptions"]  # ServerOptions: defined in .options, named here for callers

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class AdapterServer:
    """A running server; ``port`` is the bound port (ask for 0 to get a free one)."""

    def __init__(self, options: ServerOptions, *, base: Any = None):
        self.options = options
        dtype = lora_dtype(options.lora_dtype)  # a bad option fails before the base loads
        overlap = lora_overlap(options.lora_overlap)
        threads = torch_threads(options.threads)
        device = resolve_device(options.device)
        lora_backends.select(device, options.lora_backend)  # a backend that cannot run there fails before the base loads
        check_free(options.host, options.port, "--port")  # taken ports fail before the base loads
        if options.metrics_port is not None:
            check_free(options.host, options.metrics_port, "--metrics-port")
        if options.http_port is not None:
            check_free(self.http_host, options.http_port, "--http-port")
        self.metrics = Metrics()
        if threads is not None:  # before the base loads; --lora-overlap auto then counts the cores these leave
            import torch

            torch.set_num_threads(threads)
        base = base if base is not None else load_base(options.base, options.quantize, dtype=options.dtype, device=device)
        source = AdapterSource(options.registry, max_bytes=options.max_adapter_bytes)
        self.engine = Engine.create(base, source, capacity=options.max_adapters, limits=options.limits(),
                                    metrics=self.metrics, max_batch=options.max_batch, max_queue=options.max_queue,
                                    lora_dtype=dtype, lora_overlap=overlap, lora_backend=options.lora_backend,
                                    prefix_cache_bytes=options.prefix_cache_mb * 2**20,
                                    prefill_chunk=options.prefill_chunk,
                                    weight_prepack=options.weight_prepack == "auto")
        self.metrics.watch(self.engine, self.served_name)  # the gauges Kubernetes routers read, on both /metrics
        gc.collect()
        gc.freeze()  # the base's objects live as long as the server: full collections need not walk them
        interceptors: list[grpc.ServerInterceptor] = []
        self.tokens = Tokens(options.token, admin_token=options.admin_token)
        if self.tokens.enabled:
            interceptors.append(BearerTokenInterceptor(self.tokens))
        interceptors.append(ErrorInterceptor(self.metrics))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.workers), interceptors=interceptors,
                                  options=[("grpc.max_receive_message_length", options.max_message_bytes),
                                           ("grpc.so_reuseport", 0)])  # a second server must not share the port
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.engine), self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.engine, _version()), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{options.host}:{options.port}"
        creds = None
        if options.tls_cert or options.tls_key:
            creds = grpc.ssl_server_credentials([(Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes())])
        try:
            self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError as exc:  # taken since check_free: gRPC says only "Failed to bind"
            raise in_use(options.host, options.port, "--port", exc) from None
        self.metrics_port: int | None = None
        self.http: Any = None  # the HTTP door's HttpServer, once started
        self._stopped = threading.Event()  # draining: health says NOT_SERVING
        self._closed: tuple[int, int] | None = None  # what stop() returned

    @property
    def http_host(self) -> str:
        return self.options.http_host or self.options.host

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def served_name(self) -> str:
        """The base's name in the OpenAI API: ``--served-model-name``, else the base directory's name."""
        name = self.options.served_model_name
        return name or (Path(self.options.base).name if Path(self.options.base).is_dir() else self.options.base)

    def start(self) -> "AdapterServer":
        if self.options.metrics_port is not None:  # first: a taken port must not leave gRPC half started
            try:
                self.metrics_port = self.metrics.serve_http(self.options.metrics_port, self.options.host)
            except OSError as exc:
                raise in_use(self.options.host, self.options.metrics_port, "--metrics-port", exc) from None
        http = self._http_server() if self.options.http_port is not None else None  # binds: a taken port fails here
        self.server.start()
        if http is not None:
            self.http = http.start()
        for name in ("",) + SERVICE_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s:%d (base %s, %s)%s", self.options.host, self.port, self.engine.base.name,
                 self.engine.base.quantize, f"; OpenAI HTTP API on {self.http_host}:{self.http_port}" if http else "")
        return self

    def _http_server(self) -> Any:
        from .http_server import HttpServer  # uvicorn and FastAPI load only for a server with --http-port

        return HttpServer(self.http_app(), self.http_host, self.options.http_port)

    def http_app(self) -> Any:
        """The OpenAI HTTP door's ASGI app on this server's engine: on uvicorn here, called in process
        by a Ray Serve replica (:mod:`ray_app`)."""
        from .openai_api import HttpContext, create_app  # FastAPI loads only where the HTTP door is used

        context = HttpContext(self.engine, self.served_name, self.tokens, self.metrics,
                              serving=lambda: not self._stopped.is_set(), max_body_bytes=self.options.max_message_bytes,
                              workers=self.options.workers, version=_version())
        return create_app(context)

    def drain(self) -> None:
        """Stop admitting: health says NOT_SERVING (gRPC) / 503 (HTTP) while both ports still answer,
        and new requests get UNAVAILABLE / 503 with a retry hint; requests in flight go on."""
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.engine.drain()

    def stop(self, grace: float | None = None, *, hurry: Callable[[], bool] = lambda: False) -> tuple[int, int]:
        """Drain; let the requests in flight finish within ``grace`` seconds (default ``--grace``; less
        once ``hurry()``);
        end the rest with a final error (an SSE error event, a gRPC UNAVAILABLE status); then close
        both doors. Returns how many of those in flight (finished, ended)."""
        if self._closed is not None:
            return self._closed
        self.drain()
        self._closed = self.engine.stop(self.options.grace if grace is None else grace, hurry=hurry)
        flush = HURRIED_FLUSH_S if hurry() else FLUSH_S  # every request has its last event: this only sends it
        done = self.server.stop(flush)
        if self.http is not None:
            self.http.stop(flush)
        done.wait(flush + 1)
        self.metrics.close()
        gc.unfreeze()  # frozen objects are never freed: at exit, extensions would report them all as leaked
        return self._closed

    def wait(self, grace: float | None = None) -> str:
        """Serve until SIGTERM or SIGINT, then stop gracefully (a second signal: at once); returns the
        one line that says how the requests in flight ended."""
        grace = self.options.grace if grace is None else grace
        signals = StopSignals()
        name = signals.wait()
        finished, ended = self.stop(grace, hurry=signals.again)
        return summary(name, finished, ended, grace, signals.again())


FLUSH_S = 2.0  # after the engine stopped: time for the doors to send the last events they hold
HURRIED_FLUSH_S = 0.5  # after a second signal: enough for those events, and no more


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("adapterhub")
    except Exception:
        return "unknown"
