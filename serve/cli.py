"""``adapterhub serve`` and ``adapterhub generate``, added to the CLI through the
``adapterhub_register_commands`` hook like any plugin's commands (this module is a built-in plugin)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any

from adapterhub import hookimpl
from adapterhub.errors import AdapterHubError, ConfigError
from adapterhub.registry.location import add_registry_arguments, location_from_args

from .malloc import limit_arenas
from .options import ENV, FLAG, REGISTRY, ServerOptions
from .ray_cli import add_arguments as add_ray_arguments, serve_on_ray


DEFAULT_TOKEN_ENV = "ADAPTERHUB_TOKEN"


class ServerUnavailable(AdapterHubError):
    """The server could not be reached or answered with an error status."""


@hookimpl
def adapterhub_register_commands(subparsers: Any) -> None:
    add_serve_parsers(subparsers)


def add_serve_parsers(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve one base model and registry adapters over gRPC (and OpenAI's HTTP API)")
    add_option_arguments(serve)  # every ServerOptions field with a flag, in its order
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


def add_option_arguments(parser: Any) -> None:
    """A flag per :class:`ServerOptions` field, from its metadata: help, choices, default, and a
    type from its annotation; ``env`` fields take the name of a variable that holds the value."""
    hints = typing.get_type_hints(ServerOptions)
    for field in dataclasses.fields(ServerOptions):
        how, help_text, choices = field.metadata["cli"], field.metadata["help"], field.metadata["choices"]
        if how == REGISTRY:
            add_registry_arguments(parser)  # --registry DIR|URL, --registry-option, --cache-dir, --cache-max-bytes
        elif how == ENV:
            parser.add_argument(f"--{field.name.replace('_', '-')}-env", default=None, help=help_text)
        elif how == FLAG:
            kwargs: dict[str, Any] = {"help": help_text}
            if field.default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = field.default
            kind = next((t for t in (int, float) if t in (hints[field.name], *typing.get_args(hints[field.name]))), None)
            if kind is not None:
                kwargs["type"] = kind
            if choices:
                kwargs["choices"] = choices
            parser.add_argument(f"--{field.name.replace('_', '-')}", **kwargs)


def env_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The ``env`` fields' values, read from the variables their ``--...-env`` flags name (a
    variable named there must be set: serving without the token meant would be open)."""
    values: dict[str, str | None] = {}
    for field in dataclasses.fields(ServerOptions):
        if field.metadata["cli"] == ENV:
            flag, variable = f"--{field.name.replace('_', '-')}-env", getattr(args, f"{field.name}_env")
            values[field.name] = os.environ.get(variable) if variable else None
            if variable and not values[field.name]:
                raise ConfigError(f"{flag} {variable}: the environment variable is unset or empty")
    return values


def options_from_args(args: argparse.Namespace, **from_env: Any) -> ServerOptions:
    """The options the flags of :func:`add_option_arguments` give; ``from_env``: :func:`env_options`."""
    values: dict[str, Any] = dict(from_env)
    for field in dataclasses.fields(ServerOptions):
        how = field.metadata["cli"]
        if how == FLAG:
            values[field.name] = getattr(args, field.name)
        elif how == REGISTRY:
            values[field.name] = location_from_args(args)
    return ServerOptions(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .server import AdapterServer  # here: grpc and torch load only when a server starts

    from_env = env_options(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    logging.getLogger("adapterhub").setLevel(logging.INFO)
    limit_arenas()  # before the server's threads start: adapter loads must not grow it for good
    options = options_from_args(args, **from_env)
    if args.ray:
        return serve_on_ray(options, args)
    server = AdapterServer(options).start()
    print(f"serving on {args.host}:{server.port}", flush=True)
    if server.http_port is not None:
        print(f"OpenAI HTTP API on http://{server.http_host}:{server.http_port}/v1 (model {server.served_name!r}, "
              "or a registry reference)", flush=True)
    print(server.wait(), flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from .client import Client, parse_adapter_arg  # grpc loads only when a request is sent

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
