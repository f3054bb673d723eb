"""``adapterhub serve --ray``: the options of ``adapterhub serve``, served by Ray Serve replicas.

A flag on ``serve`` rather than a ``serve run`` import path, so the one parser and the one
:class:`ServerOptions` that ``adapterhub serve`` builds are what every replica gets, and the same
checks refuse a bad option before a cluster starts. Ray is an optional extra: nothing here imports
it until ``--ray`` is given (see :mod:`ray_app` for the application itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
from pathlib import Path
from typing import Any

from adapterhub.errors import ConfigError
from adapterhub.registry import registry_path

RAY_MISSING = "--ray needs Ray Serve, an optional extra: pip install 'adapterhub[ray]'"
DEFAULT_HTTP_PORT = 8000  # Ray Serve's own default


def add_arguments(serve: Any) -> None:
    serve.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: --replicas engines, each one base, behind one OpenAI HTTP ingress "
                            "(--http-host/--http-port, default port 8000) that routes a request to a replica already "
                            "holding its adapters; no gRPC door (pip install 'adapterhub[ray]')")
    serve.add_argument("--replicas", type=int, default=2, help="with --ray: engine replicas (default 2)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs Ray reserves per replica")
    serve.add_argument("--ray-address", default=None,
                       help="with --ray: a running cluster to deploy on (`ray start --head`; 'auto'); default: start "
                            "a local one, stopped on exit")
    serve.add_argument("--ray-timeout", type=float, default=300.0,
                       help="with --ray: seconds the ingress waits for a replica's answer before it says 504")


def require_ray() -> None:
    try:
        import ray.serve  # noqa: F401 - only whether it imports
    except ImportError:
        raise ConfigError(RAY_MISSING) from None


def check(args: argparse.Namespace) -> None:
    """What ``--ray`` cannot do, refused before a cluster starts."""
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: give at least 1")
    if args.tls_cert or args.tls_key:
        raise ConfigError("--tls-cert/--tls-key with --ray: Ray Serve's proxy speaks plain HTTP; terminate TLS in "
                          "front of it (a load balancer or ingress controller)")
    if args.metrics_port is not None:
        raise ConfigError("--metrics-port with --ray: each replica's metrics go through Ray's metrics export "
                          "(adapterhub_affinity_requests among them), not a port of its own")
    require_ray()


def shared_paths(options: Any) -> Any:
    """Local paths made absolute (replicas do not share the caller's working directory), and the
    default registry named, so every replica reads the one the caller meant. URLs pass as they are."""

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path.resolve()) if "://" not in value and path.exists() else value

    registry = options.registry if options.registry is not None else str(registry_path(None))
    if isinstance(registry, str):
        registry = absolute(registry)
    elif dataclasses.is_dataclass(registry) and isinstance(getattr(registry, "target", None), str):
        registry = dataclasses.replace(registry, target=absolute(registry.target))  # a location with options
    return dataclasses.replace(options, base=absolute(options.base), registry=registry)


def serve_on_ray(options: Any, args: argparse.Namespace) -> int:
    check(args)
    import ray  # the optional extra, present (require_ray)
    from ray import serve

    from . import ray_app

    options = shared_paths(options)
    host = options.http_host or options.host
    port = options.http_port if options.http_port is not None else DEFAULT_HTTP_PORT
    own_cluster = args.ray_address is None and not ray.is_initialized()
    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    try:
        ray_app.deploy(options, host=host, port=port, replicas=args.replicas, replica_cpus=args.replica_cpus,
                       timeout_s=args.ray_timeout)
        print(f"OpenAI HTTP API on http://{host}:{port}/v1 through Ray Serve: {args.replicas} replicas of base "
              f"{options.base}, registry {options.registry}, adapter-affinity routing", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(ray_app.APP)
    finally:
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
    return 0
