"""Prometheus metrics on an optional HTTP port, in a registry of their own per server."""

from __future__ import annotations

from typing import Any

from .router_metrics import RouterMetrics


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("adapterhub_requests", "RPCs by method and status", ["rpc", "status"],
                                registry=self.registry)
        self.tokens = Counter("adapterhub_tokens", "tokens processed", ["kind"], registry=self.registry)
        self.latency = Histogram("adapterhub_request_latency_seconds", "RPC latency", ["rpc"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.cache = Counter("adapterhub_adapter_cache", "adapter cache events", ["event"], registry=self.registry)
        self.batch_size = Histogram("adapterhub_batch_size", "rows per decode step", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self._server: Any = None

    def request(self, rpc: str, status: str, latency: float, response: Any) -> None:
        self.requests.labels(rpc, status).inc()
        self.latency.labels(rpc).observe(latency)
        if response is not None and hasattr(response, "completion_tokens"):
            self.tokens.labels("prompt").inc(response.prompt_tokens)
            self.tokens.labels("completion").inc(response.completion_tokens)

    def cache_event(self, event: str) -> None:
        self.cache.labels(event).inc()

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def watch(self, engine: Any, model_name: str) -> None:
        """Add the gauges Kubernetes routers read (vLLM's names), computed from ``engine`` at each scrape."""
        self.registry.register(RouterMetrics(engine, model_name))

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose ``/metrics``; returns the bound port (pass 0 for a free one)."""
        from prometheus_client import start_http_server

        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
