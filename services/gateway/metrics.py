"""Prometheus metrics with vLLM's names under a `prism:` prefix.

One registry per app (not the global one), so several gateways can live in one process (tests).
"waiting" counts requests admitted by the gateway that have no first token yet (media, encode,
decoder queue, prefill); "running" counts those streaming tokens. The decoders' own numbers
(their batch, their queue, their KV cache), polled by the health loop, are reported beside
them as `prism:decoder_num_requests_running`, `prism:decoder_num_requests_waiting` (summed
over a model's decoders) and `prism:kv_cache_usage_perc` (their mean, 0..1). The prefix cache
counters (`prism:prefix_cache_queries_total` / `_hits_total`, in prompt tokens) come from each
finished request's usage, so they need no polling. Speculative decoding's totals, summed over
the decoders' Stats, use vLLM's names: `prism:spec_decode_num_drafts_total` (row-steps that
drafted), `_num_draft_tokens_total`, `_num_accepted_tokens_total`; acceptance rate = accepted /
draft tokens, tokens per target step = 1 + accepted / drafts (also reported as gauges).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 640)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def error_kind(status: int) -> str:
    """Error label for an HTTP status."""
    return {
        400: "invalid_request",
        401: "unauthorized",
        404: "not_found",
        405: "method_not_allowed",
        408: "request_timeout",
        413: "payload_too_large",
        429: "overloaded",
        499: "client_disconnected",
        502: "bad_gateway",
        503: "unavailable",
        504: "timeout",
    }.get(status, "internal" if status >= 500 else "client_error")


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        label = ["model_name"]
        self.running = Gauge(
            "prism:num_requests_running", "Requests streaming tokens.", label, registry=r
        )
        self.waiting = Gauge(
            "prism:num_requests_waiting", "Requests without a first token yet.", label, registry=r
        )
        self.ttft = Histogram(
            "prism:time_to_first_token_seconds",
            "Arrival to first token.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "prism:inter_token_latency_seconds",
            "Time between streamed token events.",
            label,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "prism:e2e_request_latency_seconds",
            "Arrival to last token.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Where time to first token goes, per request (vLLM's names plus media/encode):
        # media = fetching and checking the request's media, encode = the Encode call (queue
        # and tower), queue/prefill/decode = the decoder's own timings (its Finish event).
        self.phases = {
            phase: Histogram(
                f"prism:request_{phase}_time_seconds",
                doc,
                label,
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
            for phase, doc in (
                ("media", "Fetching and validating the request's media (gateway)."),
                ("encode", "The encoder call: its queue, the vision/audio tower, the cache."),
                ("queue", "In the decoder before prefill: feature fetch, admission queue."),
                ("prefill", "Prefill in the decoder, admission to first token."),
                ("decode", "Decoding in the decoder, first token to last."),
            )
        }
        self.prompt_tokens = Counter(
            "prism:prompt_tokens", "Prompt tokens processed.", label, registry=r
        )
        # vLLM's APC pair, in tokens: hits / queries is the prefix cache's token hit rate.
        self.prefix_cache_queries = Counter(
            "prism:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            label,
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "prism:prefix_cache_hits",
            "Prompt tokens served from the prefix cache.",
            label,
            registry=r,
        )
        self.generation_tokens = Counter(
            "prism:generation_tokens", "Tokens generated.", label, registry=r
        )
        self.success = Counter(
            "prism:request_success",
            "Finished requests by reason.",
            [*label, "finished_reason"],
            registry=r,
        )
        self.errors = Counter(
            "prism:request_errors", "Failed requests by kind.", ["kind"], registry=r
        )

    def watch_decoders(self, backends: Callable[[], list[Any]]) -> None:
        """Report the latest Stats of `backends()`' decoders at every scrape."""
        self.registry.register(DecoderStatsCollector(lambda: decoder_totals(backends())))
        self.registry.register(SpecDecodeCollector(lambda: spec_totals(backends())))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def decoder_totals(backends: list[Any]) -> dict[str, tuple[int, int, float]]:
    """model -> (running, waiting, mean KV usage) over its healthy decoders that report."""
    acc: dict[str, list[float]] = {}
    for b in backends:
        if b.kind != "decoder" or not b.healthy or b.stats is None:
            continue
        for model in b.models:
            row = acc.setdefault(model, [0, 0, 0.0, 0])
            row[0] += b.stats.num_requests_running
            row[1] += b.stats.num_requests_waiting
            row[2] += b.stats.kv_cache_usage
            row[3] += 1
    return {m: (int(r[0]), int(r[1]), r[2] / r[3]) for m, r in acc.items()}


class DecoderStatsCollector(Collector):
    """Gauges read at scrape time from the latest Stats of every decoder."""

    _NAMES = (
        ("prism:decoder_num_requests_running", "Requests in the decoders' batches."),
        ("prism:decoder_num_requests_waiting", "Requests queued in the decoders."),
        ("prism:kv_cache_usage_perc", "Decoders' KV cache usage, 0..1 (mean)."),
    )

    def __init__(self, source: Callable[[], dict[str, tuple[int, int, float]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.source()
        for i, (name, text) in enumerate(self._NAMES):
            family = GaugeMetricFamily(name, text, labels=["model_name"])
            for model, values in sorted(stats.items()):
                family.add_metric([model], float(values[i]))
            yield family


_SPEC_FIELDS = (
    "spec_num_drafts_total", "spec_num_draft_tokens_total", "spec_num_accepted_tokens_total"
)  # fmt: skip


def spec_totals(backends: list[Any]) -> dict[str, tuple[int, int, int]]:
    """model -> (drafts, draft tokens, accepted tokens) summed over its healthy decoders."""
    acc: dict[str, list[int]] = {}
    for b in backends:
        if b.kind != "decoder" or not b.healthy or b.stats is None:
            continue
        for model in b.models:
            row = acc.setdefault(model, [0, 0, 0])
            for i, name in enumerate(_SPEC_FIELDS):
                row[i] += int(getattr(b.stats, name, 0))
    return {m: (r[0], r[1], r[2]) for m, r in acc.items()}


class SpecDecodeCollector(Collector):
    """Speculative decoding totals and the two ratios, read at scrape time."""

    _COUNTERS = (
        ("prism:spec_decode_num_drafts", "Decode steps of a sequence that drafted tokens."),
        ("prism:spec_decode_num_draft_tokens", "Tokens drafted."),
        ("prism:spec_decode_num_accepted_tokens", "Drafted tokens the target accepted."),
    )

    def __init__(self, source: Callable[[], dict[str, tuple[int, int, int]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.source()
        for i, (name, text) in enumerate(self._COUNTERS):
            family = CounterMetricFamily(name, text, labels=["model_name"])
            for model, values in sorted(stats.items()):
                family.add_metric([model], float(values[i]))
            yield family
        rate = GaugeMetricFamily(
            "prism:spec_decode_acceptance_rate", "Accepted / drafted tokens.", labels=["model_name"]
        )
        per_step = GaugeMetricFamily(
            "prism:spec_decode_tokens_per_step",
            "Tokens a drafting sequence gains per target forward pass (1 + accepted / drafts).",
            labels=["model_name"],
        )
        for model, (drafts, drafted, accepted) in sorted(stats.items()):
            rate.add_metric([model], accepted / drafted if drafted else 0.0)
            per_step.add_metric([model], 1 + accepted / drafts if drafts else 0.0)
        yield rate
        yield per_step
