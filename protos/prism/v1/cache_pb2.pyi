from prism.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryHeader(_message.Message):
    __slots__ = ("key", "namespace", "tensors", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    key: str
    namespace: str
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorSpec]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, key: _Optional[str] = ..., namespace: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorSpec, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: EntryHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[EntryHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored_bytes", "stored")
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored_bytes: int
    stored: bool
    def __init__(self, stored_bytes: _Optional[int] = ..., stored: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "namespace", "header_only")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HEADER_ONLY_FIELD_NUMBER: _ClassVar[int]
    key: str
    namespace: str
    header_only: bool
    def __init__(self, key: _Optional[str] = ..., namespace: _Optional[str] = ..., header_only: _Optional[bool] = ...) -> None: ...

class GetChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: EntryHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[EntryHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ContainsRequest(_message.Message):
    __slots__ = ("keys", "namespace")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    namespace: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., namespace: _Optional[str] = ...) -> None: ...

class ContainsResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("entries", "bytes", "capacity_bytes", "hits", "evictions")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    evictions: int
    def __init__(self, entries: _Optional[int] = ..., bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class CacheStatsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class CacheStatsResponse(_message.Message):
    __slots__ = ("memory", "disk", "misses", "puts", "disk_errors")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    DISK_ERRORS_FIELD_NUMBER: _ClassVar[int]
    memory: TierStats
    disk: TierStats
    misses: int
    puts: int
    disk_errors: int
    def __init__(self, memory: _Optional[_Union[TierStats, _Mapping]] = ..., disk: _Optional[_Union[TierStats, _Mapping]] = ..., misses: _Optional[int] = ..., puts: _Optional[int] = ..., disk_errors: _Optional[int] = ...) -> None: ...

class CacheResetRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class CacheResetResponse(_message.Message):
    __slots__ = ("removed_entries",)
    REMOVED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    removed_entries: int
    def __init__(self, removed_entries: _Optional[int] = ...) -> None: ...
