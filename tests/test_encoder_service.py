"""Encoder: content keys, the engine with an in-memory cache, and the service over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import io

import grpc
import mlx.core as mx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prism.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

from services.cache.client import CacheClient
from services.cache.servicer import entry_header
from services.cache.store import Entry, MemoryStore
from services.cache.tiered import TieredStore
from services.encoder.__main__ import load_vision_models
from services.encoder.engine import EncoderEngine, MediaItemInput
from services.encoder.keys import content_key, effective_params, model_fingerprint
from shared.api import load
from shared.errors import InvalidRequestError, ModelNotServedError
from shared.runtime import mlx_thread
from tests.service_procs import free_port, start_all


def png(seed: int, size: tuple[int, int] = (84, 56)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class MemoryCache:
    """CacheClient's interface over a dict."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, mx.array]] = {}
        self.meta: dict[str, dict[str, str]] = {}

    async def put(self, key, tensors, *, namespace="features", metadata=None, request_id=""):
        self.entries[key], self.meta[key] = dict(tensors), dict(metadata or {})
        return True

    async def get(self, key, *, namespace="features", request_id=""):
        return self.entries.get(key)

    async def contains(self, keys, *, namespace="features", request_id=""):
        return [k in self.entries for k in keys]

    async def head(self, key, *, namespace="features", request_id=""):
        if key not in self.entries:
            return None
        return entry_header(Entry.from_arrays(key, namespace, self.entries[key], self.meta[key]))

    async def reset(self, namespace=""):
        n = len(self.entries)
        self.entries.clear()
        return n

    async def close(self):
        pass


class StoreCache:
    """CacheClient's interface over the cache service's own engine, in process."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    async def put(self, key, tensors, *, namespace="features", metadata=None, request_id=""):
        return self.store.put(Entry.from_arrays(key, namespace, tensors, metadata))

    async def contains(self, keys, *, namespace="features", request_id=""):
        return self.store.contains(namespace, list(keys))

    async def head(self, key, *, namespace="features", request_id=""):
        entry = self.store.get(namespace, key)  # what the servicer's header-only Get does
        return None if entry is None else entry_header(entry)


@pytest.fixture(scope="module")
def vl_path(checkpoint_factory):
    return checkpoint_factory("qwen2_5_vl", "hf")


@pytest.fixture(scope="module")
def vision_model(vl_path):
    return mlx_thread.run_sync(load, vl_path, components=["vision"])


# ---- keys ---------------------------------------------------------------------------------


def test_content_keys_depend_on_everything_that_changes_features(vl_path, vision_model):
    fp = model_fingerprint(vl_path)
    proc = vision_model.processor
    defaults = effective_params(proc, "image", {})
    explicit = effective_params(proc, "image", {"max_pixels": defaults["max_pixels"]})
    assert defaults == explicit  # an option spelled at its default hits the same entry
    key = content_key(fp, "image", defaults, b"abc")
    assert key == content_key(fp, "image", explicit, b"abc")
    assert len({
        key,
        content_key(fp, "image", defaults, b"abd"),
        content_key(fp, "image", defaults, b"abc", "tenant-a"),
        content_key(fp, "video", defaults, b"abc"),
        content_key(fp, "image", {**defaults, "max_pixels": 1}, b"abc"),
        content_key("0" * 64, "image", defaults, b"abc"),
    }) == 6  # fmt: skip
    video = effective_params(proc, "video", {"num_frames": 4})
    assert "fps" not in video and video["num_frames"] == 4


# ---- engine with an in-memory cache ---------------------------------------------------------


def test_engine_hit_computes_nothing_and_concurrent_duplicates_share_work(vision_model):
    cache = MemoryCache()
    engine = EncoderEngine({"vl": vision_model}, cache)

    async def scenario() -> None:
        item = MediaItemInput("image", png(1))
        a, b = await asyncio.gather(engine.encode("vl", [item]), engine.encode("vl", [item]))
        assert engine.computed == 1  # the second request waited for the first
        assert a[0].ref == b[0].ref and not a[0].cache_hit and not b[0].cache_hit
        # Either request may be the one that computes, depending on task scheduling.
        assert sorted(x[0].encode_ns > 0 for x in (a, b)) == [False, True]
        ref = a[0].ref
        stored = cache.entries[ref.key]["features"]
        assert stored.shape == (ref.num_tokens, *stored.shape[1:]) and ref.grid[0] == 1
        assert cache.meta[ref.key]["num_tokens"] == str(ref.num_tokens)

        [again] = await engine.encode("vl", [item])
        assert again.cache_hit and again.encode_ns == 0 and engine.computed == 1
        assert (await engine.encode("vl", [item], tenant="t2"))[0].ref.key != ref.key
        await cache.reset()  # gone from the cache: recomputed, whatever the memo says
        assert not (await engine.encode("vl", [item]))[0].cache_hit

        with pytest.raises(ModelNotServedError):
            await engine.encode("nope", [item])
        with pytest.raises(InvalidRequestError, match="could not decode image"):
            await engine.encode("vl", [MediaItemInput("image", b"not an image")])
        with pytest.raises(InvalidRequestError, match="does not accept audio"):
            await engine.encode("vl", [MediaItemInput("audio", b"RIFF")])

    asyncio.run(scenario())


def test_reused_feature_is_a_hit_in_the_cache_stats(vision_model):
    store = TieredStore(MemoryStore(64 << 20))
    engine = EncoderEngine({"vl": vision_model}, StoreCache(store))

    async def scenario() -> None:
        item = MediaItemInput("image", png(3))
        assert not (await engine.encode("vl", [item]))[0].cache_hit
        assert (await engine.encode("vl", [item]))[0].cache_hit and engine.computed == 1

    asyncio.run(scenario())
    stats = store.stats("features")  # the first Contains missed, the second hit in memory
    assert (stats.memory.hits, stats.misses, stats.puts, stats.memory.entries) == (1, 1, 1, 1)


def test_fresh_engine_rebuilds_the_ref_from_the_shared_cache(vision_model):
    """A second replica, or the encoder after a restart: the cache holds the features, the memo
    is empty. The ref comes from the entry's header, the tower does not run."""
    store = TieredStore(MemoryStore(64 << 20))
    first = EncoderEngine({"vl": vision_model}, StoreCache(store))
    item = MediaItemInput("image", png(4))
    [computed] = asyncio.run(first.encode("vl", [item]))
    assert not computed.cache_hit and first.computed == 1
    before = store.stats("features")

    second = EncoderEngine({"vl": vision_model}, StoreCache(store))
    [reused] = asyncio.run(second.encode("vl", [item]))
    assert reused.cache_hit and reused.encode_ns == 0 and second.computed == 0
    assert reused.ref == computed.ref
    after = store.stats("features")  # that one lookup: exactly one hit, no miss, no put
    assert after.memory.hits - before.memory.hits == 1
    assert (after.misses, after.puts) == (before.misses, before.puts)

    async def both() -> list[list]:  # concurrent requests of a third replica: hits, no work
        third = EncoderEngine({"vl": vision_model}, StoreCache(store))
        out = await asyncio.gather(third.encode("vl", [item]), third.encode("vl", [item]))
        assert third.computed == 0
        return out

    assert all(r[0].cache_hit and r[0].ref == computed.ref for r in asyncio.run(both()))


@pytest.mark.parametrize(
    "damage",
    [
        "no metadata",  # an entry written before the encoder stored (or read) its metadata
        "num_tokens=x",
        "num_tokens=1",  # does not fit the features' shape
        "modality=video",
        "grid=1,a,2",
        "seconds_per_grid=",
        "tensor renamed",
    ],
)
def test_entry_without_usable_metadata_is_recomputed(vision_model, damage):
    store = TieredStore(MemoryStore(64 << 20))
    item = MediaItemInput("image", png(5))
    first = EncoderEngine({"vl": vision_model}, StoreCache(store))
    [good] = asyncio.run(first.encode("vl", [item]))
    stored = store.get("features", good.ref.key)
    assert stored is not None
    meta, tensors = dict(stored.metadata), dict(stored.tensors)
    if damage == "no metadata":
        meta = {}
    elif damage == "tensor renamed":
        tensors = {"feats": tensors["features"]}
    else:
        name, value = damage.split("=")
        meta[name] = value
    store.put(Entry(stored.key, stored.namespace, tensors, meta))

    second = EncoderEngine({"vl": vision_model}, StoreCache(store))
    [again] = asyncio.run(second.encode("vl", [item]))
    assert not again.cache_hit and second.computed == 1 and again.ref == good.ref
    rewritten = store.get("features", good.ref.key)
    assert rewritten is not None and rewritten.metadata == stored.metadata  # repaired


def test_text_only_model_is_refused_at_start_up(checkpoint_factory):
    args = argparse.Namespace(
        model=[str(checkpoint_factory("qwen3", "hf"))], served_model_name=[], dtype=None
    )
    with pytest.raises(ValueError, match="text-only"):
        mlx_thread.run_sync(load_vision_models, args)


# ---- the service ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(vl_path, tmp_path_factory):
    """(encoder address, cache address): real subprocesses on free loopback ports."""
    taken: set[int] = set()
    cache_port, encoder_port = free_port(taken=taken), free_port(taken=taken)
    cache_addr = f"127.0.0.1:{cache_port}"
    encoder_args = ["--model", str(vl_path), "--served-model-name", "vl", "--cache", cache_addr]
    services = start_all(
        [
            ("services.cache", ["--memory-mb", "64"], cache_port),
            ("services.encoder", encoder_args, encoder_port),
        ],
        tmp_path_factory.mktemp("encoder-logs"),
    )
    yield services[1].address, cache_addr
    codes = {s.log.name: s.stop() for s in reversed(services)}
    assert set(codes.values()) == {0}, codes  # SIGTERM drains and exits cleanly


def test_service_encodes_once_then_hits(encoder):
    address, cache_addr = encoder

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="prism.v1.Encoder"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            stub = encoder_pb2_grpc.EncoderStub(channel)
            [info] = (await stub.ListModels(common_pb2.ListModelsRequest(), timeout=10)).models
            assert info.id == "vl" and info.family == "qwen2_5_vl"
            assert set(info.modalities) >= {common_pb2.MODALITY_IMAGE, common_pb2.MODALITY_VIDEO}

            item = encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE, data=png(7))
            request = encoder_pb2.EncodeRequest(model="vl", items=[item, item])
            first = await stub.Encode(request, timeout=60)
            a, b = first.items
            assert not a.cache_hit and a.encode_ns > 0 and a.ref == b.ref
            assert a.ref.num_tokens > 0 and len(a.ref.grid) == 3
            assert a.ref.tensors[0].name == "features"
            assert list(a.ref.tensors[0].shape)[0] == a.ref.num_tokens

            [again] = (await stub.Encode(encoder_pb2.EncodeRequest(model="vl", items=[item]))).items
            assert again.cache_hit and again.encode_ns == 0 and again.ref == a.ref
            cache = CacheClient(cache_addr)
            stats = await cache.stats("features")  # one Contains missed, the next one hit
            assert (stats.memory.hits, stats.misses, stats.puts) == (1, 1, 1)
            await cache.close()

            for bad, code in [
                (encoder_pb2.EncodeRequest(model="nope", items=[item]), grpc.StatusCode.NOT_FOUND),
                (
                    encoder_pb2.EncodeRequest(
                        model="vl",
                        items=[
                            encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE, data=b"x")
                        ],
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Encode(bad, timeout=30)
                assert err.value.code() == code

    asyncio.run(scenario())
