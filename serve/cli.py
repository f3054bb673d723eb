"""``adapterhub serve`` and ``adapterhub generate``, added to the CLI through the
``adapterhub_register_commands`` hook like any plugin's commands (this module is a built-in plugin)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from adapterhub import hookimpl
from adapterhub.base import DTYPE_CHOICES, QUANTIZE_CHOICES
from adapterhub.errors import AdapterHubError, ConfigError
from adapterhub.registry.location import add_registry_arguments, location_from_args


DEFAULT_TOKEN_ENV = "ADAPTERHUB_TOKEN"


class ServerUnavailable(AdapterHubError):
    """The server could not be reached or answered with an error status."""


@hookimpl
def adapterhub_register_commands(subparsers: Any) -> None:
    add_serve_parsers(subparsers)


def add_serve_parsers(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve one base model and registry adapters over gRPC (and OpenAI's HTTP API)")
    serve.add_argument("--base", required=True, help="base model directory or Hub id")
    serve.add_argument("--quantize", default="nf4", choices=QUANTIZE_CHOICES)
    serve.add_argument("--device", default="auto",
                       help="where the base, its KV cache, the adapter slots and sampling live: auto (the first GPU "
                            "when there is one, else the CPU), cpu, cuda, cuda:N")
    serve.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="compute dtype of the base (auto: the checkpoint's own on a GPU, float32 on the CPU); "
                            "a quantized base dequantizes to it")
    add_registry_arguments(serve)  # --registry DIR|URL, --registry-option, --cache-dir, --cache-max-bytes
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--max-adapters", type=int, default=8, help="adapters kept resident (LRU; pinned never evicted)")
    serve.add_argument("--max-batch", type=int, default=32, help="rows per decode step")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before RESOURCE_EXHAUSTED")
    serve.add_argument("--lora-dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                       help="precision of resident LoRA weights: auto = the base's compute dtype; float16 halves "
                            "each adapter's memory and the bytes a mixed batch reads per step")
    serve.add_argument("--lora-overlap", default="auto", choices=("auto", "on", "off"),
                       help="run a mixed batch's LoRA on a core of its own while the base layers run (memory-bound "
                            "beside compute-bound work); auto = when torch's threads leave a core unused")
    serve.add_argument("--lora-backend", default="auto", choices=("auto", "c", "triton", "torch"),
                       help="mixed-batch LoRA: auto = the C kernel on the CPU, Triton on CUDA; torch = the plain "
                            "PyTorch reference (any device)")
    serve.add_argument("--max-new-tokens", type=int, default=512, help="per-request limit")
    serve.add_argument("--max-adapters-per-request", type=int, default=4)
    serve.add_argument("--token-env", default=None,
                       help="name of an environment variable holding a bearer token clients must send")
    serve.add_argument("--admin-token-env", default=None,
                       help="environment variable holding a separate bearer token for the Admin service")
    serve.add_argument("--max-message-bytes", type=int, default=4 * 2**20,
                       help="largest request message accepted (gRPC max_receive_message_length)")
    serve.add_argument("--max-context-tokens", type=int, default=512,
                       help="prompt + new tokens per request (capped at the base's context length)")
    serve.add_argument("--max-adapter-bytes", type=int, default=None,
                       help="refuse to load adapter versions with a file larger than this")
    serve.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    serve.add_argument("--http-port", type=int, default=None,
                       help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                            "/v1/models, /health, /metrics) on this port, on the same engine")
    serve.add_argument("--http-host", default=None, help="address of the HTTP API (default: --host)")
    serve.add_argument("--served-model-name", default=None,
                       help="the base's model name in the HTTP API (default: the --base directory's name)")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="on SIGTERM or SIGINT: health turns NOT_SERVING / 503, new requests are refused "
                            "(UNAVAILABLE / 503), and the requests in flight get this many seconds to finish "
                            "before they end with a final error; a second signal ends them at once (default 10)")
    from .ray_cli import add_arguments as add_ray_arguments

    add_ray_arguments(serve)  # --ray, --replicas, ...: the same options, served by Ray Serve replicas
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="send one request to a running server")
    gen.add_argument("text", help="prompt (raw text), or the user message with --chat")
    gen.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    gen.add_argument("--adapter", action="append", default=[], metavar="REF[:WEIGHT]",
                     help="registry reference, repeatable to compose, e.g. --adapter a@prod --adapter b@2:0.5, or a "
                          "composition as the HTTP API's model takes it: --adapter 'a@prod+b@2:0.5'")
    gen.add_argument("--chat", action="store_true", help="send TEXT as a user message through the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--token-env", default=None,
                     help=f"environment variable with the bearer token (default {DEFAULT_TOKEN_ENV}, sent when set); "
                          "a variable named here must be set")
    gen.add_argument("--tls-ca", help="PEM root certificate to verify a TLS server")
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.set_defaults(func=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .malloc import limit_arenas
    from .server import AdapterServer, ServerOptions

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ConfigError(f"--token-env {args.token_env}: the environment variable is unset or empty")
    admin_token = None
    if args.admin_token_env:
        admin_token = os.environ.get(args.admin_token_env)
        if not admin_token:
            raise ConfigError(f"--admin-token-env {args.admin_token_env}: the environment variable is unset or empty")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    logging.getLogger("adapterhub").setLevel(logging.INFO)
    limit_arenas()  # before the server's threads start: adapter loads must not grow it for good
    options = ServerOptions(
        base=args.base, registry=location_from_args(args), quantize=args.quantize, dtype=args.dtype, host=args.host, port=args.port,
        max_adapters=args.max_adapters, max_batch=args.max_batch, max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens, max_adapters_per_request=args.max_adapters_per_request,
        token=token, admin_token=admin_token, max_message_bytes=args.max_message_bytes,
        max_context_tokens=args.max_context_tokens, max_adapter_bytes=args.max_adapter_bytes,
        tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port, lora_dtype=args.lora_dtype,
        lora_overlap=args.lora_overlap, device=args.device, lora_backend=args.lora_backend, http_port=args.http_port, http_host=args.http_host,
        served_model_name=args.served_model_name)
    if args.ray:
        from .ray_cli import serve_on_ray

        return serve_on_ray(options, args)
    server = AdapterServer(options).start()
    print(f"serving on {args.host}:{server.port}", flush=True)
    if server.http_port is not None:
        print(f"OpenAI HTTP API on http://{server.http_host}:{server.http_port}/v1 (model {server.served_name!r}, "
              "or a registry reference)", flush=True)
    print(server.wait(args.grace), flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from .client import Client, parse_adapter_arg

    token = os.environ.get(args.token_env or DEFAULT_TOKEN_ENV) or None
    if args.token_env and token is None:  # named on purpose: sending no token would fail later, and say less
        raise ConfigError(f"--token-env {args.token_env}: the environment variable is unset or empty")
    adapters = [term for value in args.adapter for term in parse_adapter_arg(value)]
    root = open(args.tls_ca, "rb").read() if args.tls_ca else None
    client = Client(args.server, token=token, root_cert=root, timeout=args.timeout)
    kwargs = dict(adapters=adapters, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.chat:
        kwargs["messages"] = [("user", args.text)]
        prompt = None
    else:
        prompt = args.text
    try:
        if args.stream:
            for chunk in client.stream(prompt, **kwargs):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            response = client.generate(prompt, **kwargs)
            print(response.text)
            used = ", ".join(f"{a.requested} -> {a.resolved}" for a in response.adapters) or "base model"
            print(f"[{used}; {response.completion_tokens} tokens; {response.finish_reason}]", file=sys.stderr)
    except grpc.RpcError as exc:
        raise ServerUnavailable(f"{args.server}: {exc.code().name}: {exc.details()}") from None
    finally:
        client.close()
    return 0
