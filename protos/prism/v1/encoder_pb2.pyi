from prism.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaOptions(_message.Message):
    __slots__ = ("min_pixels", "max_pixels", "fps", "min_frames", "max_frames", "num_frames", "sample_rate")
    MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MIN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    min_pixels: int
    max_pixels: int
    fps: float
    min_frames: int
    max_frames: int
    num_frames: int
    sample_rate: int
    def __init__(self, min_pixels: _Optional[int] = ..., max_pixels: _Optional[int] = ..., fps: _Optional[float] = ..., min_frames: _Optional[int] = ..., max_frames: _Optional[int] = ..., num_frames: _Optional[int] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class MediaItem(_message.Message):
    __slots__ = ("modality", "data", "options")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    modality: _common_pb2.Modality
    data: bytes
    options: MediaOptions
    def __init__(self, modality: _Optional[_Union[_common_pb2.Modality, str]] = ..., data: _Optional[bytes] = ..., options: _Optional[_Union[MediaOptions, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "model", "items", "tenant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    items: _containers.RepeatedCompositeFieldContainer[MediaItem]
    tenant: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., tenant: _Optional[str] = ...) -> None: ...

class EncodedItem(_message.Message):
    __slots__ = ("ref", "cache_hit", "encode_ns")
    REF_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    ref: _common_pb2.MediaFeatureRef
    cache_hit: bool
    encode_ns: int
    def __init__(self, ref: _Optional[_Union[_common_pb2.MediaFeatureRef, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., encode_ns: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EncodedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[EncodedItem, _Mapping]]] = ...) -> None: ...
