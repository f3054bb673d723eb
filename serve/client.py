"""A small synchronous client for the Inference and Admin services."""

from __future__ import annotations

from typing import Iterator, Sequence

import grpc

from ._proto import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from .model_names import parse_composition


def parse_adapter_arg(value: str) -> list[tuple[str, float]]:
    """One ``--adapter``: a reference with an optional weight, or a composition in the HTTP API's
    ``model`` grammar (``a@1+b@prod:0.5``, see :mod:`model_names`), so both doors take the same text."""
    return parse_composition(value, "--adapter")


class Client:
    """``Client("127.0.0.1:50051").generate("hi", adapters=["sentiment@prod"])``."""

    def __init__(self, target: str, *, token: str | None = None, root_cert: bytes | None = None,
                 timeout: float | None = 60.0):
        if root_cert is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_cert))
        else:
            self.channel = grpc.insecure_channel(target)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    @staticmethod
    def request(prompt: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None,
                adapters: Sequence[str | tuple[str, float]] = (), max_new_tokens: int = 0, temperature: float = 0.0,
                top_p: float = 0.0, seed: int = 0, stop: Sequence[str] = ()) -> inference_pb2.GenerateRequest:
        refs = [a if isinstance(a, tuple) else (a, 1.0) for a in adapters]
        return inference_pb2.GenerateRequest(
            prompt=prompt or "", messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages or ()],
            adapters=[inference_pb2.AdapterRef(ref=r, weight=w) for r, w in refs], max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, stop=list(stop))

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> inference_pb2.GenerateResponse:
        return self.inference.Generate(self.request(prompt, **kwargs), timeout=timeout or self.timeout,
                                       metadata=self.metadata)

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[inference_pb2.GenerateChunk]:
        return self.inference.GenerateStream(self.request(prompt, **kwargs), timeout=timeout or self.timeout,
                                             metadata=self.metadata)

    def list_adapters(self) -> admin_pb2.ListAdaptersResponse:
        return self.admin.ListAdapters(admin_pb2.ListAdaptersRequest(), timeout=self.timeout, metadata=self.metadata)

    def load(self, ref: str) -> admin_pb2.AdapterResponse:
        return self.admin.LoadAdapter(admin_pb2.AdapterRequest(ref=ref), timeout=self.timeout, metadata=self.metadata)

    def unload(self, ref: str) -> admin_pb2.UnloadAdapterResponse:
        return self.admin.UnloadAdapter(admin_pb2.AdapterRequest(ref=ref), timeout=self.timeout, metadata=self.metadata)

    def pin(self, ref: str) -> admin_pb2.AdapterResponse:
        return self.admin.PinAdapter(admin_pb2.AdapterRequest(ref=ref), timeout=self.timeout, metadata=self.metadata)

    def unpin(self, ref: str) -> admin_pb2.AdapterResponse:
        return self.admin.UnpinAdapter(admin_pb2.AdapterRequest(ref=ref), timeout=self.timeout, metadata=self.metadata)

    def info(self) -> admin_pb2.ServerInfoResponse:
        return self.admin.ServerInfo(admin_pb2.ServerInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
