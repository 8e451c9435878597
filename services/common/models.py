"""Model identity for the services: served ids, ModelInfo protos, modality enum mapping."""

from __future__ import annotations

from collections.abc import Sequence

from prism.v1 import common_pb2

from shared.loading.config import text_config
from shared.rpc.modalities import MODALITY_TO_PROTO, PROTO_TO_MODALITY, modality_name
from shared.runtime.loaded import LoadedModel

__all__ = ["MODALITY_TO_PROTO", "PROTO_TO_MODALITY", "modality_name"]

DEMO_FLAG = "prism_demo"  # config.json key written by shared.testing.demo: weights are random
DEFAULT_CONTEXT = 32768


def served_ids(models: Sequence[str], names: Sequence[str]) -> list[tuple[str, str]]:
    """(model id, checkpoint) pairs: `--served-model-name` where given, else `--model` as given."""
    if len(names) > len(models):
        raise ValueError("more --served-model-name values than --model values")
    ids = [names[i] if i < len(names) and names[i] else m for i, m in enumerate(models)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"served model ids must be unique, got {ids}")
    return list(zip(ids, models, strict=True))


def context_length(model: LoadedModel) -> int:
    return int(text_config(model.config).get("max_position_embeddings") or DEFAULT_CONTEXT)


def model_info(
    model_id: str, model: LoadedModel, max_context: int | None = None
) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        id=model_id,
        family=model.family.name,
        modalities=[MODALITY_TO_PROTO[m] for m in model.family.modalities],
        max_context_tokens=max_context or context_length(model),
        random_weights=bool(model.config.get(DEMO_FLAG, False)),
    )
