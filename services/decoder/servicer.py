"""Decoder gRPC servicer: fetch features, build the prompt, stream the engine's events.

Everything that can fail with a status (unknown model, bad parameters, missing features, full
queue) fails before the first message is streamed, so callers can retry cleanly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
import mlx.core as mx
import structlog
from prism.v1 import cache_pb2, common_pb2, decoder_pb2, decoder_pb2_grpc

from services.common.models import model_info
from services.decoder.apc.prefix import PrefixCache
from services.decoder.apc.remote import RemoteTier
from services.decoder.engine import (
    DecoderEngine,
    Delta,
    EngineRequest,
    Finish,
    LogitsOptions,
    TokenLogprob,
)
from services.decoder.prompt import build_prompt, check_modalities, media_refs, prefix_keys
from services.decoder.structured import (
    OutputDefaults,
    OutputPlan,
    OutputProcessor,
    plan_output,
    template_kwargs,
)
from services.decoder.token_text import TokenText
from shared.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    MissingFeaturesError,
    ModelNotServedError,
)
from shared.models.base import MAIN_FEATURES, MediaFeatures
from shared.runtime.sampling import SamplingParams

log = structlog.get_logger("decoder")

FINISH_REASONS = {
    "stop": decoder_pb2.FINISH_REASON_STOP,
    "length": decoder_pb2.FINISH_REASON_LENGTH,
    "cancelled": decoder_pb2.FINISH_REASON_CANCELLED,
    "error": decoder_pb2.FINISH_REASON_ERROR,
}


class FeatureSource(Protocol):
    """The part of `services.cache.client.CacheClient` the decoder uses."""

    async def get(
        self, key: str, *, namespace: str = ..., request_id: str = ...
    ) -> dict[str, mx.array] | None: ...


def engine_options(request: decoder_pb2.GenerateRequest) -> dict[str, Any]:
    """EngineRequest fields for sampling and stopping, validated before any feature is fetched.

    Options not implemented yet are refused rather than silently ignored."""
    s, stop, out = request.sampling, request.stop, request.output
    if s.n > 1:
        raise InvalidRequestError("n > 1 is not supported yet", param="n")
    if any(not -100 <= b <= 100 for b in s.logit_bias.values()):
        raise InvalidRequestError("logit_bias values must be in [-100, 100]", param="logit_bias")
    penalty = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
    if penalty <= 0:
        raise InvalidRequestError("repetition_penalty must be > 0", param="repetition_penalty")
    sampling = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=s.seed if s.HasField("seed") else None,
    )
    try:
        sampling.validate()
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return dict(
        sampling=sampling,
        logits=LogitsOptions(
            logit_bias=dict(s.logit_bias),
            repetition_penalty=penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_tokens=stop.min_tokens,
        ),
        max_tokens=stop.max_tokens,
        stop=tuple(stop.stop),
        stop_token_ids=frozenset(stop.stop_token_ids),
        ignore_eos=stop.ignore_eos,
        logprobs=out.logprobs or out.top_logprobs > 0,
        top_logprobs=out.top_logprobs,
        speculative=not request.speculative.disable,
        num_draft_tokens=request.speculative.num_draft_tokens,
    )


def to_proto(
    event: Delta | Finish, tokens: TokenText | None = None
) -> decoder_pb2.GenerateResponse:
    if isinstance(event, Delta):
        delta = decoder_pb2.Delta(text=event.text, token_ids=list(event.token_ids))
        if event.logprobs and tokens is not None:
            delta.logprobs.extend(logprob_proto(lp, tokens) for lp in event.logprobs)
        return decoder_pb2.GenerateResponse(delta=delta)
    t = event.timings
    return decoder_pb2.GenerateResponse(
        finish=decoder_pb2.Finish(
            reason=FINISH_REASONS[event.reason],
            stop_sequence=event.stop_sequence,
            usage=common_pb2.Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                cached_prompt_tokens=event.cached_tokens,
                accepted_draft_tokens=event.accepted_draft_tokens,
            ),
            timings=decoder_pb2.Timings(
                queue_ns=t.queue_ns,
                feature_fetch_ns=t.feature_fetch_ns,
                prefill_ns=t.prefill_ns,
                decode_ns=t.decode_ns,
            ),
            error=event.error,
        )
    )


def logprob_proto(lp: TokenLogprob, tokens: TokenText) -> decoder_pb2.TokenLogprob:
    """OpenAI's shape: each token's text and raw bytes, with its top alternatives."""
    top = []
    for token_id, logprob in lp.top:
        text, raw = tokens(token_id)
        top.append(
            decoder_pb2.TopLogprob(token_id=token_id, token=text, logprob=logprob, bytes=raw)
        )
    text, raw = tokens(lp.token_id)
    return decoder_pb2.TokenLogprob(
        token_id=lp.token_id, token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top
    )


def prepare(
    model: Any,
    request: decoder_pb2.GenerateRequest,
    fetched: dict[str, MediaFeatures],
    defaults: OutputDefaults,
) -> tuple[Any, list[MediaFeatures], OutputPlan]:
    """Prompt, features and output plan (constraints): CPU work, run off the event loop."""
    kwargs = template_kwargs(request, defaults)
    prompt, features = build_prompt(model, request, fetched, kwargs)
    plan = plan_output(model, request, prompt.input_ids, defaults, kwargs.get("enable_thinking"))
    return prompt, features, plan


def prepare_with_keys(
    engine: DecoderEngine,
    request: decoder_pb2.GenerateRequest,
    fetched: dict[str, MediaFeatures],
    defaults: OutputDefaults,
) -> tuple[Any, list[MediaFeatures], OutputPlan, list[str]]:
    """`prepare`, plus the prompt's APC block keys (hashing is CPU work too)."""
    prompt, features, plan = prepare(engine.model, request, fetched, defaults)
    return prompt, features, plan, prefix_keys(engine.prefix, engine.model, request, prompt)


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(
        self,
        engine: DecoderEngine,
        cache: FeatureSource,
        defaults: OutputDefaults | None = None,
        remote: RemoteTier | None = None,
    ) -> None:
        """remote: the cache service as the prefix cache's second tier (None: memory only)."""
        self.engine, self.cache, self.remote = engine, cache, remote
        self.defaults = defaults or OutputDefaults()
        self.tokens = TokenText(engine.model.tokenizer)  # logprobs' token text and bytes

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: decoder_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decoder_pb2.GenerateResponse]:
        engine = self.engine
        if request.model != engine.model_id:
            raise ModelNotServedError(
                f"model {request.model!r} is not served here; this decoder serves "
                f"{engine.model_id!r}"
            )
        rid = request.request_id or structlog.contextvars.get_contextvars().get("request_id", "")
        options = engine_options(request)
        refs = media_refs(request)
        check_modalities(engine.model, engine.model_id, refs)
        start = time.perf_counter_ns()
        fetched = await self._fetch([r.content_key for r in refs], rid, context.time_remaining())
        fetch_ns = time.perf_counter_ns() - start
        # Tokenising and compiling grammars are CPU work without MLX: off the event loop.
        prompt, features, plan, keys = await asyncio.to_thread(
            prepare_with_keys, engine, request, fetched, self.defaults
        )
        if keys and self.remote is not None:
            await self.remote.preload(keys, len(prompt.input_ids), rid)
        handle = engine.submit(
            EngineRequest(
                rid,
                prompt,
                features,
                feature_fetch_ns=fetch_ns,
                constraints=plan.constraints,
                prefix_keys=keys,
                **options,
            )
        )
        post = OutputProcessor(plan)
        try:
            async for event in handle:
                for message in post.process(to_proto(event, self.tokens)):
                    yield message
        finally:  # client cancelled, deadline passed, or done: free the slot (idempotent)
            handle.cancel()

    async def _fetch(
        self, keys: list[str], rid: str, timeout: float | None
    ) -> dict[str, MediaFeatures]:
        """All features or MissingFeaturesError naming every absent key."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        gets = asyncio.gather(*(self.cache.get(k, request_id=rid) for k in unique))
        try:
            entries: list[Any] = await asyncio.wait_for(gets, timeout)
        except asyncio.TimeoutError as exc:
            raise DeadlineExceededError("feature fetch ran past the request deadline") from exc
        missing = [
            k for k, e in zip(unique, entries, strict=True) if not e or MAIN_FEATURES not in e
        ]
        if missing:
            raise MissingFeaturesError(missing)
        # Every tensor of the entry: the main features plus any extras (DeepStack levels).
        fetched = {k: MediaFeatures.from_tensors(e) for k, e in zip(unique, entries, strict=True)}
        # Deserialising may leave lazy views (bfloat16) built on this thread; evaluate them here,
        # since lazy arrays cannot cross to the MLX thread (see shared.runtime.mlx_thread).
        mx.eval([f.tensors() for f in fetched.values()])
        return fetched

    async def ListModels(  # noqa: N802
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        info = model_info(self.engine.model_id, self.engine.model, self.engine.max_model_len)
        return common_pb2.ListModelsResponse(models=[info])

    async def Stats(  # noqa: N802
        self, request: decoder_pb2.DecoderStatsRequest, context: grpc.aio.ServicerContext
    ) -> decoder_pb2.DecoderStatsResponse:
        s = self.engine.stats()
        return decoder_pb2.DecoderStatsResponse(
            num_requests_running=s.running,
            num_requests_waiting=s.waiting,
            kv_cache_usage=s.kv_usage,
            prompt_tokens_total=s.prompt_tokens_total,
            generation_tokens_total=s.generation_tokens_total,
            requests_total=s.requests_total,
            spec_num_drafts_total=s.spec_num_drafts,
            spec_num_draft_tokens_total=s.spec_num_draft_tokens,
            spec_num_accepted_tokens_total=s.spec_num_accepted_tokens,
        )

    async def PrefixCacheStats(  # noqa: N802
        self, request: decoder_pb2.PrefixCacheStatsRequest, context: grpc.aio.ServicerContext
    ) -> decoder_pb2.PrefixCacheStatsResponse:
        return prefix_stats_proto(self.engine.prefix)

    async def PrefixCacheReset(  # noqa: N802
        self, request: decoder_pb2.PrefixCacheResetRequest, context: grpc.aio.ServicerContext
    ) -> decoder_pb2.PrefixCacheResetResponse:
        removed = self.engine.prefix.reset()
        queued = self.remote.discard() if self.remote is not None else 0
        log.info("apc_reset", removed_blocks=removed, dropped_writes=queued)
        return decoder_pb2.PrefixCacheResetResponse(removed_blocks=removed)


def prefix_stats_proto(prefix: PrefixCache) -> decoder_pb2.PrefixCacheStatsResponse:
    c, pool = prefix.counters, prefix.pool
    p = pool.counters
    return decoder_pb2.PrefixCacheStatsResponse(
        enabled=prefix.enabled,
        block_size=prefix.block_size,
        queries=c.queries,
        query_tokens=c.query_tokens,
        matched_tokens=c.matched_tokens,
        memory_hits=p.memory_hits,
        remote_hits=p.remote_hits,
        misses=p.misses,
        memory=cache_pb2.TierStats(
            entries=len(pool),
            bytes=pool.nbytes,
            capacity_bytes=pool.capacity,
            hits=p.hits,
            evictions=p.evictions,
        ),  # fmt: skip
        blocks_written=c.blocks_written,
    )


def add_to_server(  # noqa: ANN201
    engine: DecoderEngine,
    cache: FeatureSource,
    defaults: OutputDefaults | None = None,
    remote: RemoteTier | None = None,
):
    def add(server: grpc.aio.Server) -> list[str]:
        servicer = DecoderServicer(engine, cache, defaults, remote)
        decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
        return ["prism.v1.Decoder"]

    return add
