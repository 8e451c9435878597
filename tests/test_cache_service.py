"""The cache service as a real process: large entries over the wire, restart, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import mlx.core as mx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.v1 import cache_pb2, cache_pb2_grpc, common_pb2

from services.cache.client import CacheClient
from shared.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CacheProcess:
    """`python -m services.cache --port 0`; the port comes from its `serving` log line."""

    def __init__(self, tmp: Path, disk: Path, *extra: str) -> None:
        self.log_path = tmp / f"cache-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "services.cache", "--port", "0", "--disk-path", str(disk)]
        self.proc = subprocess.Popen(
            [*cmd, "--memory-mb", "128", "--grace", "2", *extra], cwd=ROOT, stderr=self._log
        )
        self.port = self._wait_for_port()
        self.address = f"127.0.0.1:{self.port}"
        self._wait_serving()

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"cache exited {self.proc.returncode}:\n{self.log_path.read_text()}")

    def _wait_for_port(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "serving":
                    return int(json.loads(line)["port"])
            self._check_alive()
            time.sleep(0.05)
        pytest.fail(f"no `serving` line within {timeout}s:\n{self.log_path.read_text()}")

    def _wait_serving(self, timeout: float = 30.0) -> None:
        request = health_pb2.HealthCheckRequest(service="prism.v1.Cache")
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    if stub.Check(request, timeout=1).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                self._check_alive()
                time.sleep(0.05)
        pytest.fail(f"health never SERVING:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self._log.close()
        return code


@pytest.fixture
def start_cache(tmp_path: Path) -> Iterator:
    started: list[CacheProcess] = []

    def start(disk: Path, *extra: str) -> CacheProcess:
        started.append(CacheProcess(tmp_path, disk, *extra))
        return started[-1]

    yield start
    for p in started:
        p.stop(signal.SIGKILL)


def same_bits(a: mx.array, b: mx.array) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and mx.array_equal(a.view(mx.uint32), b.view(mx.uint32))
    )


async def _wait_on_disk(client: CacheClient, entries: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.stats()).disk.entries < entries:
        assert time.monotonic() < deadline, "the disk write never landed"
        await asyncio.sleep(0.05)


def test_large_entry_round_trip_and_restart(tmp_path: Path, start_cache) -> None:
    big = mx.random.normal((3_000, 2_500), key=mx.random.key(0))  # 30 MB of float32
    small = mx.arange(10).astype(mx.bfloat16)
    disk = tmp_path / "disk"

    async def first_life(address: str) -> None:
        client = CacheClient(address, timeout=60)
        meta = {"grid": "1,60,50"}
        assert await client.put("k1", {"features": big, "extra": small}, metadata=meta)
        got = await client.get("k1", request_id="req-1")
        assert got is not None and list(got) == ["features", "extra"]
        assert same_bits(got["features"], big) and mx.array_equal(got["extra"], small)
        assert await client.contains(["k1", "nope"]) == [True, False]
        assert await client.contains(["k1"], namespace="kv") == [False]
        assert await client.get("nope") is None
        stats = await client.stats()  # Contains counts like Get: k1 hit twice, 3 misses
        assert (stats.puts, stats.misses, stats.memory.entries, stats.memory.hits) == (1, 3, 1, 2)
        await _wait_on_disk(client, 1)
        await client.close()

    async def second_life(address: str) -> None:
        client = CacheClient(address, timeout=60)
        stats = await client.stats()
        assert (stats.memory.entries, stats.disk.entries) == (0, 1)
        assert await client.contains(["k1"]) == [True]
        got = await client.get("k1")
        assert got is not None and same_bits(got["features"], big)
        assert (await client.stats()).disk.hits == 2  # the Contains and the Get
        assert await client.reset("kv") == 0
        assert await client.reset("features") == 1
        assert await client.contains(["k1"]) == [False]
        await client.close()

    first = start_cache(disk)
    asyncio.run(first_life(first.address))
    first.stop(signal.SIGKILL)  # no goodbye: only what reached the disk survives
    second = start_cache(disk)
    asyncio.run(second_life(second.address))


def test_header_only_get_sends_no_data_and_counts_one_lookup(tmp_path, start_cache) -> None:
    cache = start_cache(tmp_path / "disk")
    features = mx.arange(6 * 4, dtype=mx.float32).reshape(6, 4)
    meta = {"grid": "1,4,6", "num_tokens": "6"}

    async def scenario() -> None:
        client = CacheClient(cache.address, timeout=30)
        assert await client.put("k1", {"features": features}, metadata=meta)
        header = await client.head("k1")
        assert header is not None and header.key == "k1" and dict(header.metadata) == meta
        [spec] = header.tensors
        assert (spec.name, spec.dtype, list(spec.shape)) == ("features", "float32", [6, 4])
        assert await client.head("nope") is None
        assert await client.head("k1", namespace="kv") is None
        stats = await client.stats("features")  # one hit, one miss: each head is one lookup
        assert (stats.memory.hits, stats.misses) == (1, 1)
        await client.close()

    asyncio.run(scenario())
    with grpc.insecure_channel(cache.address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        chunks = list(stub.Get(cache_pb2.GetRequest(key="k1", header_only=True), timeout=10))
        assert [c.WhichOneof("part") for c in chunks] == ["header"]  # no data chunks
        assert chunks[0].header.tensors[0].name == "features"
        full = list(stub.Get(cache_pb2.GetRequest(key="k1"), timeout=10))
        assert [c.WhichOneof("part") for c in full] == ["header", "data"]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Get(cache_pb2.GetRequest(key="nope", header_only=True), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_put_is_invalid_argument_and_dead_cache_is_unavailable(tmp_path, start_cache) -> None:
    cache = start_cache(tmp_path / "disk")
    spec = common_pb2.TensorSpec(name="x", dtype="float32", shape=[4])
    header = cache_pb2.EntryHeader(key="k", namespace="features", tensors=[spec])
    with grpc.insecure_channel(cache.address) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        for data in (b"\0" * 12, b"\0" * 20):  # 16 bytes declared
            chunks = [cache_pb2.PutChunk(header=header), cache_pb2.PutChunk(data=data)]
            with pytest.raises(grpc.RpcError) as err:
                stub.Put(iter(chunks), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cache.stop() == 0

    async def call_dead() -> None:
        client = CacheClient(cache.address, timeout=5)
        with pytest.raises(BackendUnavailableError):
            await client.contains(["k"])
        await client.close()

    asyncio.run(call_dead())


def test_sigterm_turns_health_not_serving_and_exits_zero(tmp_path, start_cache) -> None:
    cache = start_cache(tmp_path / "disk")
    request = health_pb2.HealthCheckRequest(service="prism.v1.Cache")
    with grpc.insecure_channel(cache.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=30)
        assert next(watch).status == SERVING
        cache.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # an open stream would hold the drain for the whole grace period
    # Wait, never signal again: a second SIGTERM after the handlers are gone would kill it.
    assert cache.proc.wait(timeout=30) == 0
    assert '"event": "stopped"' in cache.log_path.read_text()
