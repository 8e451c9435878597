"""Encoder gRPC servicer: EncodeRequest <-> EncoderEngine (errors are mapped by the interceptor)."""

from __future__ import annotations

import grpc
import structlog
from prism.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

from services.common.models import MODALITY_TO_PROTO, modality_name, model_info
from services.encoder.engine import EncodedItem, EncoderEngine, MediaItemInput

_INT_OPTIONS = ("min_pixels", "max_pixels", "min_frames", "max_frames", "num_frames")


def options_dict(options: encoder_pb2.MediaOptions) -> dict[str, float]:
    """Only the options the client set (0 means "the model's default")."""
    out: dict[str, float] = {
        k: int(getattr(options, k)) for k in _INT_OPTIONS if getattr(options, k)
    }
    if options.fps:
        out["fps"] = float(options.fps)
    return out


def to_proto(item: EncodedItem) -> encoder_pb2.EncodedItem:
    ref = item.ref
    return encoder_pb2.EncodedItem(
        ref=common_pb2.MediaFeatureRef(
            content_key=ref.key,
            modality=MODALITY_TO_PROTO[ref.modality],
            num_tokens=ref.num_tokens,
            grid=list(ref.grid),
            seconds_per_grid=ref.seconds_per_grid,
            tensors=[
                common_pb2.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape))
                for t in ref.tensors
            ],
        ),
        cache_hit=item.cache_hit,
        encode_ns=item.encode_ns,
    )


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, engine: EncoderEngine) -> None:
        self.engine = engine

    async def Encode(  # noqa: N802 - gRPC method name
        self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeResponse:
        rid = request.request_id or structlog.contextvars.get_contextvars().get("request_id", "")
        items = [
            MediaItemInput(modality_name(it.modality), it.data, options_dict(it.options))
            for it in request.items
        ]
        encoded = await self.engine.encode(
            request.model, items, request.tenant, rid, timeout=context.time_remaining()
        )
        return encoder_pb2.EncodeResponse(items=[to_proto(e) for e in encoded])

    async def ListModels(  # noqa: N802
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(
            models=[model_info(mid, m) for mid, m in self.engine.models.items()]
        )


def add_to_server(engine: EncoderEngine):  # noqa: ANN201 - returns PrismServer's callback
    def add(server: grpc.aio.Server) -> list[str]:
        encoder_pb2_grpc.add_EncoderServicer_to_server(EncoderServicer(engine), server)
        return ["prism.v1.Encoder"]

    return add
