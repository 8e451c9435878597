"""Modality names ("image", ...) <-> the prism.v1 Modality enum, shared by services and gateway."""

from __future__ import annotations

from prism.v1 import common_pb2

MODALITY_TO_PROTO: dict[str, int] = {
    "text": common_pb2.MODALITY_TEXT,
    "image": common_pb2.MODALITY_IMAGE,
    "video": common_pb2.MODALITY_VIDEO,
    "audio": common_pb2.MODALITY_AUDIO,
}
PROTO_TO_MODALITY: dict[int, str] = {v: k for k, v in MODALITY_TO_PROTO.items()}


def modality_name(value: int) -> str:
    """Proto enum -> "image"/"video"/...; "unspecified" for anything unknown."""
    return PROTO_TO_MODALITY.get(value, "unspecified")
