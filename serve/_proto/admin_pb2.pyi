from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResidentAdapter(_message.Message):
    __slots__ = ("ref", "method", "pinned", "mixed_batch", "in_use", "form")
    REF_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MIXED_BATCH_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    ref: str
    method: str
    pinned: bool
    mixed_batch: bool
    in_use: int
    form: str
    def __init__(self, ref: _Optional[str] = ..., method: _Optional[str] = ..., pinned: _Optional[bool] = ..., mixed_batch: _Optional[bool] = ..., in_use: _Optional[int] = ..., form: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ...) -> None: ...

class AdapterRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class AdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: ResidentAdapter
    def __init__(self, adapter: _Optional[_Union[ResidentAdapter, _Mapping]] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("ref", "was_resident")
    REF_FIELD_NUMBER: _ClassVar[int]
    WAS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    was_resident: bool
    def __init__(self, ref: _Optional[str] = ..., was_resident: _Optional[bool] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("base_name", "base_fingerprint", "quantization", "cache_capacity", "adapters", "max_batch_size", "max_adapters_per_request", "context_length", "version")
    BASE_NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    CACHE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    base_name: str
    base_fingerprint: str
    quantization: str
    cache_capacity: int
    adapters: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    max_batch_size: int
    max_adapters_per_request: int
    context_length: int
    version: str
    def __init__(self, base_name: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., quantization: _Optional[str] = ..., cache_capacity: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., max_adapters_per_request: _Optional[int] = ..., context_length: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
