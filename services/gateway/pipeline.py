"""One request's way through the backends: model lookup and media checks -> media bytes ->
Encoder.Encode -> Decoder.Generate, opened up to its first event.

Everything that can fail before a byte is streamed fails here, as a PrismError, so the route
can still answer with a proper status (429 with Retry-After, 503, 404...). A decoder that
reports missing features gets them re-encoded once; a backend that answers UNAVAILABLE is
marked down and the next healthy one is tried (nothing was streamed yet, so this is safe).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import structlog
from prism.v1 import common_pb2, decoder_pb2, encoder_pb2

from services.gateway.backends import BackendPools
from services.gateway.config import GatewayConfig
from services.gateway.errors import BadGatewayError, GatewayTimeoutError, ModelNotFoundError
from services.gateway.generation import Generation
from services.gateway.media import MediaLoader
from services.gateway.messages import MediaSpec, Message
from services.gateway.metrics import GatewayMetrics
from services.gateway.rpc_errors import rpc_error
from shared.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    MissingFeaturesError,
    PrismError,
)
from shared.rpc.channels import request_metadata
from shared.rpc.modalities import MODALITY_TO_PROTO

log = structlog.get_logger("gateway")

_INT_OPTIONS = ("min_pixels", "max_pixels", "min_frames", "max_frames", "num_frames")


@dataclass
class Job:
    request_id: str
    model: str
    messages: list[Message]
    media: list[MediaSpec]
    request: decoder_pb2.GenerateRequest  # sampling/stop/output/tools already filled in
    tenant: str
    deadline: float  # time.monotonic() by which every call must be done
    arrived: float = field(default_factory=time.perf_counter)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise GatewayTimeoutError("request timed out")
        return left


class Pipeline:
    def __init__(
        self,
        config: GatewayConfig,
        pools: BackendPools,
        loader: MediaLoader,
        metrics: GatewayMetrics,
    ) -> None:
        self.config, self.pools, self.loader, self.metrics = config, pools, loader, metrics

    def model_info(self, model: str) -> common_pb2.ModelInfo:
        info = self.pools.models().get(model)
        if info is not None:
            return info
        if any(b.kind == "decoder" and not b.models for b in self.pools.backends):
            # A decoder we could never ask may serve it: "try again", not "no such model".
            raise BackendUnavailableError(
                f"model `{model}` is not served by any reachable decoder; some are unavailable"
            )
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

    def check_media(self, model: str, info: common_pb2.ModelInfo, specs: list[MediaSpec]) -> None:
        accepted = self.pools.modality_names(info)
        for spec in specs:
            if spec.modality not in accepted:
                raise InvalidRequestError(
                    f"model {model} does not accept {spec.modality} input; it accepts "
                    f"{', '.join(accepted)}",
                    param=spec.param,
                )
        images = sum(s.modality == "image" for s in specs)
        others = len(specs) - images
        for count, limit, what in (
            (images, self.config.max_images_per_request, "images"),
            (others, self.config.max_media_per_request, "video and audio items"),
        ):
            if count > limit:
                raise InvalidRequestError(
                    f"{count} {what} in one request; the limit is {limit}", param="messages"
                )

    async def start(self, job: Job) -> Generation:
        waiting = self.metrics.waiting.labels(job.model)
        waiting.inc()
        try:
            blobs: list[bytes] = []
            refs: list[common_pb2.MediaFeatureRef] = []
            if job.media:
                with self._timed("media", job.model):
                    blobs = await self.loader.load_all(job.media)
                with self._timed("encode", job.model):
                    refs = await self.encode(job, blobs)
            try:
                return await self._open(job, refs)
            except MissingFeaturesError as exc:
                if not blobs:
                    raise
                # The cache lost (or never got) the features: encode again, retry once.
                log.info("features_missing_reencoding", keys=exc.keys)
                return await self._open(job, await self.encode(job, blobs))
        except BaseException:
            waiting.dec()  # on success the Generation owns the gauge
            raise

    @contextmanager
    def _timed(self, phase: str, model: str) -> Iterator[None]:
        """Observe a media phase's time when it succeeds (`prism:request_<phase>_time_seconds`)."""
        start = time.perf_counter()
        yield
        self.metrics.phases[phase].labels(model).observe(time.perf_counter() - start)

    async def encode(self, job: Job, blobs: list[bytes]) -> list[common_pb2.MediaFeatureRef]:
        items = []
        for spec, blob in zip(job.media, blobs, strict=True):
            opts = {k: int(v) if k in _INT_OPTIONS else v for k, v in spec.options.items()}
            items.append(
                encoder_pb2.MediaItem(
                    modality=MODALITY_TO_PROTO[spec.modality],
                    data=blob,
                    options=encoder_pb2.MediaOptions(**opts),
                )
            )
        req = encoder_pb2.EncodeRequest(
            request_id=job.request_id, model=job.model, items=items, tenant=job.tenant
        )
        failure: PrismError | None = None
        for backend in self.pools.candidates("encoder", job.model):
            try:
                resp = await backend.stub.Encode(
                    req, timeout=job.remaining(), metadata=request_metadata(job.request_id)
                )
            except grpc.aio.AioRpcError as err:
                failure = rpc_error(err, backend, self.pools)
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    continue
                raise failure from err
            if len(resp.items) != len(items):
                raise BadGatewayError(f"encoder returned {len(resp.items)} of {len(items)} items")
            return [item.ref for item in resp.items]
        raise failure or BackendUnavailableError(f"no encoder available for model {job.model}")

    def build_request(
        self, job: Job, refs: list[common_pb2.MediaFeatureRef]
    ) -> decoder_pb2.GenerateRequest:
        req = decoder_pb2.GenerateRequest()
        req.CopyFrom(job.request)
        req.request_id, req.model, req.tenant = job.request_id, job.model, job.tenant
        pending = iter(refs)
        for msg in job.messages:
            out = req.messages.messages.add(
                role=msg.role,
                name=msg.name,
                tool_call_id=msg.tool_call_id,
                tool_calls_json=msg.tool_calls_json,
                reasoning_content=msg.reasoning_content,
            )
            for part in msg.parts:
                if part.media is not None:
                    out.content.add(media=next(pending))
                else:
                    out.content.add(text=part.text or "")
        req.messages.add_generation_prompt = True
        return req

    async def _open(self, job: Job, refs: list[common_pb2.MediaFeatureRef]) -> Generation:
        req = self.build_request(job, refs)
        failure: PrismError | None = None
        for backend in self.pools.candidates("decoder", job.model):
            call = backend.stub.Generate(
                req, timeout=job.remaining(), metadata=request_metadata(job.request_id)
            )
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as err:
                failure = rpc_error(err, backend, self.pools)
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    continue
                raise failure from err
            except BaseException:
                call.cancel()  # e.g. the client went away while we waited
                raise
            if first is grpc.aio.EOF:
                raise BadGatewayError("decoder closed the stream without an event")
            return Generation(
                job.model, job.arrived, call, backend, first, self.pools, self.metrics
            )
        raise failure or BackendUnavailableError(f"no decoder available for model {job.model}")
