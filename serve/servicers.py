"""Thin servicers: protobuf in, domain objects to the engine, protobuf out. No error handling here:
exceptions propagate to :mod:`interceptors`, which maps them to status codes."""

from __future__ import annotations

from typing import Any, Iterator

from ._proto import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from .convert import chunk_to_proto, request_from_proto, resident_to_proto, response_to_proto
from .engine import Engine


def _submit(engine: Engine, request: Any, context: Any, *, stream: bool):
    seq = engine.submit(request_from_proto(request, engine.limits), timeout=context.time_remaining(), stream=stream)
    context.add_callback(seq.cancel)
    return seq


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    def Generate(self, request, context):
        return response_to_proto(_submit(self.engine, request, context, stream=False).result())

    def GenerateStream(self, request, context) -> Iterator[inference_pb2.GenerateChunk]:
        for chunk in _submit(self.engine, request, context, stream=True).chunks():
            yield chunk_to_proto(chunk)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, engine: Engine, version: str = ""):
        self.engine = engine
        self.version = version

    def ListAdapters(self, request, context):
        return admin_pb2.ListAdaptersResponse(adapters=[resident_to_proto(e) for e in self.engine.cache.snapshot()])

    def LoadAdapter(self, request, context):
        return admin_pb2.AdapterResponse(adapter=resident_to_proto(self.engine.cache.load(request.ref)))

    def UnloadAdapter(self, request, context):
        ref, was = self.engine.cache.unload(request.ref)
        return admin_pb2.UnloadAdapterResponse(ref=ref, was_resident=was)

    def PinAdapter(self, request, context):
        return admin_pb2.AdapterResponse(adapter=resident_to_proto(self.engine.cache.set_pinned(request.ref, True)))

    def UnpinAdapter(self, request, context):
        return admin_pb2.AdapterResponse(adapter=resident_to_proto(self.engine.cache.set_pinned(request.ref, False)))

    def ServerInfo(self, request, context):
        e = self.engine
        return admin_pb2.ServerInfoResponse(
            base_name=e.base.name, base_fingerprint=e.base.fingerprint, quantization=e.base.quantize,
            cache_capacity=e.cache.capacity, adapters=[resident_to_proto(x) for x in e.cache.snapshot()],
            max_batch_size=e.max_batch, max_adapters_per_request=e.limits.max_adapters_per_request,
            context_length=e.limits.context_length, version=self.version)
