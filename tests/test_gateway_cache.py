"""The gateway's side of prefix caching (issue #5): cached_tokens in usage, the APC metrics,
/v1/cache/stats and /v1/cache/reset over two fake decoders and a real, in-process cache
service, and the tenant salt."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import mlx.core as mx
import openai
import pytest
from starlette.requests import Request

from services.cache.servicer import add_cache_servicer
from services.cache.store import Entry, MemoryStore
from services.cache.tiered import TieredStore
from services.gateway.common import tenant
from services.gateway.config import GatewayConfig, config_from_args
from services.gateway.testing import FakeDecoder, FakeServer, FakeStack, model_info, prefix_stats
from services.launcher.stack import Stack, StackConfig
from shared.rpc.ports import free_port
from shared.rpc.server import PrismServer

KEY = "sk-cache-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
T = TypeVar("T")
CHAT = {"model": "txt", "messages": [{"role": "user", "content": "hi"}]}


class CacheThread:
    """The real cache servicer (memory tier only) on its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.store = TieredStore(MemoryStore(1 << 20))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: PrismServer | None = None
        port = self._run(self._start())
        self.address = f"127.0.0.1:{port}"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=20)

    async def _start(self) -> int:
        self.server = PrismServer(add_cache_servicer(self.store), grace=0)
        return await self.server.start("127.0.0.1:0")

    def fill(self, kv: int, features: int) -> None:
        """Empty the store, then `kv` and `features` entries of 16 bytes each."""
        self.store.reset()
        for ns, count in (("kv", kv), ("features", features)):
            for i in range(count):
                self.store.put(Entry.from_arrays(f"{ns}-{i}", ns, {"t": mx.zeros((4,))}))

    def stop(self) -> None:
        assert self.server is not None
        self._run(self.server.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.store.close()


@pytest.fixture(scope="module")
def cache() -> Iterator[CacheThread]:
    c = CacheThread()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stack(cache: CacheThread) -> Iterator[FakeStack]:
    models = [model_info("txt", ("text",))]
    d0, d1 = FakeDecoder("d0", models), FakeDecoder("d1", models)
    # d1 has APC off: `enabled` is any decoder's, block_size comes from the enabled ones.
    d1.prefix_stats = prefix_stats(seed=2, block_size=0)
    d1.prefix_stats.enabled = False
    d1.removed_blocks = 5
    s = FakeStack([], [FakeServer(d0), FakeServer(d1)], api_key=KEY, cache=cache.address)
    yield s
    s.stop()


def decoders(stack: FakeStack) -> list[FakeDecoder]:
    return [d.servicer for d in stack.decoders]


@pytest.fixture
def cached(stack: FakeStack) -> Iterator[None]:
    """Both decoders report 6 cached prompt tokens for the test's duration."""
    for d in decoders(stack):
        d.cached_tokens = 6
    yield
    for d in decoders(stack):
        d.cached_tokens = 2


@pytest.fixture(scope="module")
def client(stack: FakeStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0, timeout=20)


# ---- usage and metrics ---------------------------------------------------------------------


def test_cached_tokens_in_chat_and_responses(client: openai.OpenAI, cached: None) -> None:
    out = client.chat.completions.create(**CHAT)
    assert out.usage.prompt_tokens_details.cached_tokens == 6
    chunks = list(
        client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 6
    r = client.responses.create(model="txt", input="hi")
    assert r.usage.input_tokens_details.cached_tokens == 6


def test_cached_tokens_present_when_zero(stack: FakeStack) -> None:
    for d in decoders(stack):
        d.cached_tokens = 0
    try:
        chat = httpx.post(stack.url + "/v1/chat/completions", json=CHAT, headers=AUTH).json()
        body = {"model": "txt", "input": "hi"}
        resp = httpx.post(stack.url + "/v1/responses", json=body, headers=AUTH).json()
    finally:
        for d in decoders(stack):
            d.cached_tokens = 2
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert resp["usage"]["input_tokens_details"]["cached_tokens"] == 0


def _metric(stack: FakeStack, name: str) -> float:
    text = httpx.get(stack.url + "/metrics", headers=AUTH).text
    line = f'{name}{{model_name="txt"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_prefix_cache_metrics(client: openai.OpenAI, stack: FakeStack, cached: None) -> None:
    names = ("prism:prefix_cache_queries_total", "prism:prefix_cache_hits_total")
    before = [_metric(stack, n) for n in names]
    client.chat.completions.create(**CHAT)
    after = [_metric(stack, n) for n in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [10, 6]  # prompt, cached


# ---- /v1/cache/stats and /v1/cache/reset --------------------------------------------------


def test_stats_sums_decoders_and_reports_cache_namespaces(
    stack: FakeStack, cache: CacheThread
) -> None:
    cache.fill(kv=2, features=1)
    r = httpx.get(stack.url + "/v1/cache/stats", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "cache.stats"
    p = body["prefix_cache"]  # seeds 1 + 2: every counter is 3x its per-seed value
    assert (p["enabled"], p["block_size"], p["decoders"]) == (True, 16, 2)
    assert (p["queries"], p["query_tokens"], p["matched_tokens"]) == (9, 300, 144)
    assert (p["memory_hits"], p["remote_hits"], p["misses"], p["blocks_written"]) == (6, 3, 12, 27)
    assert p["hit_rate"] == pytest.approx(0.48)
    assert p["memory"] == {
        "entries": 15,
        "bytes": 1800,
        "capacity_bytes": 3000,
        "hits": 21,
        "evictions": 3,
    }
    service = body["cache_service"]
    assert set(service) == {"kv", "features"}
    kv, features = service["kv"], service["features"]
    assert (kv["memory"]["entries"], kv["memory"]["bytes"], kv["puts"]) == (2, 32, 2)
    assert (features["memory"]["entries"], features["memory"]["bytes"]) == (1, 16)
    assert kv["memory"]["capacity_bytes"] == 1 << 20
    assert kv["disk"] == {"entries": 0, "bytes": 0, "capacity_bytes": 0, "hits": 0, "evictions": 0}
    assert set(kv) == {"memory", "disk", "misses", "puts", "disk_errors"}


def test_reset_prefix_by_default(stack: FakeStack, cache: CacheThread) -> None:
    cache.fill(kv=2, features=1)
    before = [d.resets for d in decoders(stack)]
    r = httpx.post(stack.url + "/v1/cache/reset", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "cache.reset"
    assert body["removed_blocks"] == 7 + 5 and body["removed_entries"] == {"kv": 2}
    assert [d.resets for d in decoders(stack)] == [n + 1 for n in before]
    assert cache.store.stats("kv").memory.entries == 0
    assert cache.store.stats("features").memory.entries == 1  # features kept by default


def test_reset_features_only(stack: FakeStack, cache: CacheThread) -> None:
    cache.fill(kv=2, features=3)
    before = [d.resets for d in decoders(stack)]
    body = {"prefix": False, "features": True}
    r = httpx.post(stack.url + "/cache/reset", json=body, headers=AUTH)  # no /v1 works too
    assert r.status_code == 200, r.text
    assert r.json()["removed_blocks"] == 0 and r.json()["removed_entries"] == {"features": 3}
    assert [d.resets for d in decoders(stack)] == before  # decoders left alone
    assert cache.store.stats("kv").memory.entries == 2


@pytest.mark.parametrize("body", [{"prefix": "yes"}, {"feature": True}, [1]])
def test_reset_bad_body_is_400(stack: FakeStack, body: object) -> None:
    r = httpx.post(stack.url + "/v1/cache/reset", json=body, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["none", "bad"])
def test_cache_endpoints_need_the_api_key(stack: FakeStack, headers: dict[str, str]) -> None:
    resets = [d.resets for d in decoders(stack)]
    for method, path in (("GET", "/v1/cache/stats"), ("POST", "/v1/cache/reset")):
        r = httpx.request(method, stack.url + path, headers=headers)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert [d.resets for d in decoders(stack)] == resets


@pytest.mark.parametrize("cache_addr", [None, "unreachable"])
def test_without_cache_service(cache_addr: str | None) -> None:
    """Not configured or down: stats still show the decoders, with cache_service null."""
    address = f"127.0.0.1:{free_port('127.0.0.1')}" if cache_addr else None
    decoder = FakeServer(FakeDecoder("d", [model_info("txt", ("text",))]))
    s = FakeStack([], [decoder], cache=address)
    try:
        stats = httpx.get(s.url + "/v1/cache/stats", timeout=20).json()
        reset = httpx.post(s.url + "/v1/cache/reset", timeout=20)
    finally:
        s.stop()
    assert stats["cache_service"] is None
    assert stats["prefix_cache"]["decoders"] == 1 and stats["prefix_cache"]["queries"] == 3
    if address is None:
        assert reset.status_code == 200
        assert reset.json()["removed_blocks"] == 7 and reset.json()["removed_entries"] is None
    else:  # a reset that could not reach the cache is an error, never a silent partial one
        assert reset.status_code == 503 and "cache service" in reset.json()["error"]["message"]


# ---- tenant salt ---------------------------------------------------------------------------


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def test_tenant_salt_rules() -> None:
    off, on = GatewayConfig(), GatewayConfig(api_key=KEY)
    assert tenant(_request({}), off) == ""
    assert tenant(_request({"X-APC-Tenant": " team-a "}), off) == "team-a"
    # Keys on: the key's digest always leads; the header only narrows it.
    assert tenant(_request(AUTH), on) == _digest(KEY)
    header = {**AUTH, "X-APC-Tenant": "team-a"}
    assert tenant(_request(header), on) == f"{_digest(KEY)}:team-a"
    # Naming another key's salt in the header does not land in that key's tenant.
    other = _digest("sk-other")
    assert tenant(_request({**AUTH, "X-APC-Tenant": other}), on) != other
    assert not tenant(_request({**AUTH, "X-APC-Tenant": other}), on).startswith(other)


def test_tenant_salt_reaches_the_decoder(client: openai.OpenAI, stack: FakeStack) -> None:
    counts = [len(d.requests) for d in decoders(stack)]
    client.chat.completions.create(**CHAT, extra_headers={"X-APC-Tenant": "team-b"})
    new = [
        d.requests[-1] for d, n in zip(decoders(stack), counts, strict=True) if len(d.requests) > n
    ]
    assert [r.tenant for r in new] == [f"{_digest(KEY)}:team-b"]


# ---- flags and launcher --------------------------------------------------------------------


def test_cache_flag_env_and_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRISM_CACHE_ADDR", raising=False)
    assert config_from_args([]).cache is None
    assert config_from_args(["--cache", "c:1"]).cache == "c:1"
    monkeypatch.setenv("PRISM_CACHE_ADDR", "c:2")
    assert config_from_args([]).cache == "c:2"
    stack = Stack(StackConfig(model="m"))  # builds command lines only, starts nothing
    argv = stack.child("gateway").argv
    assert argv[argv.index("--cache") + 1] == stack.address("cache")
