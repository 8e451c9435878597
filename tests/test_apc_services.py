"""Prefix caching across processes: a cache service with a disk tier and two decoder replicas.

Blocks computed by one replica are hits on the other, survive restarting the decoder and the
cache service, are never shared across tenants, and a damaged shard on disk is recomputed
rather than served. Every answer is token-identical to the first, uncached one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prism.v1 import cache_pb2, cache_pb2_grpc, decoder_pb2, decoder_pb2_grpc

from tests.service_procs import Service, free_port, spawn, wait_serving

BS = 16
DOCUMENT = "The committee met on Tuesday to review the budget, the plan and the schedule. " * 12


def request(tenant: str = "", question: str = "Summarise it.") -> decoder_pb2.GenerateRequest:
    text = decoder_pb2.ContentPart(text=f"{DOCUMENT}\n\n{question}")
    message = decoder_pb2.ChatMessage(role="user", content=[text])
    return decoder_pb2.GenerateRequest(
        model="txt",
        messages=decoder_pb2.Messages(messages=[message], add_generation_prompt=True),
        stop=decoder_pb2.StopConditions(max_tokens=8, ignore_eos=True),
        tenant=tenant,
    )


Answer = tuple[list[int], decoder_pb2.Finish]


def generate(address: str, req: decoder_pb2.GenerateRequest) -> Answer:
    with grpc.insecure_channel(address) as channel:
        tokens, finish = [], None
        for reply in decoder_pb2_grpc.DecoderStub(channel).Generate(req, timeout=60):
            if reply.HasField("delta"):
                tokens += reply.delta.token_ids
            else:
                finish = reply.finish
    assert finish is not None and finish.reason == decoder_pb2.FINISH_REASON_LENGTH
    return tokens, finish


def prefix_stats(address: str) -> decoder_pb2.PrefixCacheStatsResponse:
    with grpc.insecure_channel(address) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)
        return stub.PrefixCacheStats(decoder_pb2.PrefixCacheStatsRequest(), timeout=10)


def kv_stats(address: str) -> cache_pb2.CacheStatsResponse:
    with grpc.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        return stub.Stats(cache_pb2.CacheStatsRequest(namespace="kv"), timeout=10)


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)  # poll interval, not a guess


class Cluster:
    """One cache service (disk tier) and two decoders of one text model."""

    def __init__(self, model: Path, disk: Path, logs: Path) -> None:
        self.model, self.disk, self.logs = model, disk, logs
        self.cache_port = free_port()
        self.cache = self._cache()
        self.decoders = [self._decoder() for _ in range(2)]
        start_all_started([self.cache, *self.decoders])

    def _cache(self) -> Service:
        args = ["--disk-path", str(self.disk), "--memory-mb", "64"]
        return spawn("services.cache", args, self.logs, self.cache_port)

    def _decoder(self, port: int | None = None) -> Service:
        args = ["--model", str(self.model), "--served-model-name", "txt",
                "--cache", f"127.0.0.1:{self.cache_port}", "--apc-block-size", str(BS)]  # fmt: skip
        return spawn("services.decoder", args, self.logs, port)

    def restart(self, index: int) -> None:
        """Restart the cache service and decoder `index` (SIGTERM: queued writes land)."""
        old = self.decoders[index]
        assert old.stop() == 0 and self.cache.stop() == 0
        self.cache = self._cache()
        self.decoders[index] = self._decoder(old.port)
        start_all_started([self.cache, self.decoders[index]])

    def stop(self) -> None:
        for service in [*self.decoders, self.cache]:
            service.stop()


def start_all_started(services: list[Service]) -> None:
    for service in services:
        wait_serving(service)


@pytest.fixture(scope="module")
def cluster(checkpoint_factory, tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("apc")
    (root / "logs").mkdir()
    running = Cluster(checkpoint_factory("qwen3", "hf"), root / "disk", root / "logs")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def first(cluster) -> Answer:
    """The uncached answer, from replica 0; its blocks then reach the cache service."""
    tokens, finish = generate(cluster.decoders[0].address, request())
    assert finish.usage.cached_prompt_tokens == 0
    blocks = finish.usage.prompt_tokens // BS
    wait_for("blocks stored", lambda: kv_stats(cluster.cache.address).puts >= blocks)
    return tokens, finish


def usable(finish: decoder_pb2.Finish) -> int:
    return (finish.usage.prompt_tokens - 1) // BS * BS


def test_a_prefix_computed_on_one_replica_is_a_hit_on_the_other(cluster, first) -> None:
    tokens, finish = generate(cluster.decoders[1].address, request())
    assert tokens == first[0]
    assert finish.usage.cached_prompt_tokens == usable(first[1]) > 8 * BS
    stats = prefix_stats(cluster.decoders[1].address)
    assert stats.remote_hits == usable(first[1]) // BS and stats.memory_hits == 0


def test_another_tenant_never_hits(cluster, first) -> None:
    cache, blocks = cluster.cache.address, first[1].usage.prompt_tokens // BS
    before = kv_stats(cache).puts
    # Replica 1 and the cache service both hold the default tenant's blocks of this prompt.
    tokens, finish = generate(cluster.decoders[1].address, request(tenant="bob"))
    assert tokens == first[0] and finish.usage.cached_prompt_tokens == 0
    wait_for("bob's blocks stored", lambda: kv_stats(cache).puts >= before + blocks)
    tokens, finish = generate(cluster.decoders[0].address, request(tenant="bob"))
    assert tokens == first[0] and finish.usage.cached_prompt_tokens == usable(first[1])


def test_blocks_survive_restarting_the_decoder_and_the_cache_service(cluster, first) -> None:
    cluster.restart(1)
    tokens, finish = generate(cluster.decoders[1].address, request())
    assert tokens == first[0] and finish.usage.cached_prompt_tokens == usable(first[1])
    assert kv_stats(cluster.cache.address).disk.hits >= usable(first[1]) // BS


def test_a_damaged_shard_is_recomputed_not_served(cluster, first) -> None:
    cluster.restart(1)  # the memory tiers are empty: what follows reads the disk
    files = sorted(p for p in cluster.disk.rglob("*") if p.is_file())
    assert files
    for path in files:  # flip one byte of every stored entry's data
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    tokens, finish = generate(cluster.decoders[1].address, request(question="Summarise it!"))
    assert finish.usage.cached_prompt_tokens == 0
    assert kv_stats(cluster.cache.address).disk_errors >= 1
    again, finish = generate(cluster.decoders[1].address, request())
    assert again == first[0]


def test_reset_empties_both_tiers(cluster, first) -> None:
    """Its own tenant, so no other test's writes can land after the reset."""
    decoder, cache = cluster.decoders[0].address, cluster.cache.address
    puts, sent = kv_stats(cache).puts, prefix_stats(decoder).blocks_written
    tokens, finish = generate(decoder, request(tenant="reset"))
    assert tokens == first[0] and finish.usage.cached_prompt_tokens == 0
    # A reset cannot recall a write already under way: let this request's writes land first.
    new = prefix_stats(decoder).blocks_written - sent
    wait_for("block writes landed", lambda: kv_stats(cache).puts >= puts + new)
    with grpc.insecure_channel(decoder) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)
        reply = stub.PrefixCacheReset(decoder_pb2.PrefixCacheResetRequest(), timeout=10)
    assert reply.removed_blocks >= new > 0
    with grpc.insecure_channel(cache) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        stub.Reset(cache_pb2.CacheResetRequest(namespace="kv"), timeout=10)
    assert prefix_stats(decoder).memory.entries == 0
    tokens, finish = generate(decoder, request(tenant="reset"))
    assert tokens == first[0] and finish.usage.cached_prompt_tokens == 0
