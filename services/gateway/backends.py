"""Encoder and decoder pools: addresses, health, model discovery, round-robin routing.

Each configured address may be a DNS name that resolves to several hosts; every host becomes
its own backend (re-resolved periodically), so requests spread over all of them. A background
task checks `grpc.health.v1` every `interval` seconds and refreshes each backend's models with
ListModels; a call that fails with UNAVAILABLE marks its backend down at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import socket
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, encoder_pb2_grpc

from shared.rpc.channels import CHANNEL_OPTIONS
from shared.rpc.modalities import PROTO_TO_MODALITY

log = structlog.get_logger("gateway")

RERESOLVE_EVERY = 15  # health rounds between DNS re-resolutions
SLOW_CHECKS_DOWN = 3  # consecutive late health answers that mark a healthy backend down


def expand_address(address: str) -> list[str]:
    """ "host:port" (or "dns:///host:port") -> one "ip:port" per resolved host.

    IP literals and "localhost" stay as given: localhost resolves to both 127.0.0.1 and ::1
    while a local server usually listens on one of them only.
    """
    target = address.removeprefix("dns:///").removeprefix("dns:")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return [target]
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return [target]
    except ValueError:
        pass
    if bare == "localhost":
        return [target]
    try:
        infos = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
    except OSError:
        return [target]  # unresolvable for now: grpc retries, health marks it down
    out: list[str] = []
    for *_, sockaddr in infos:
        ip = str(sockaddr[0])
        hostport = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        if hostport not in out:
            out.append(hostport)
    return out or [target]


@dataclass
class Backend:
    kind: str  # "encoder" | "decoder"
    address: str
    configured_as: str
    channel: grpc.aio.Channel
    stub: Any
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    models: dict[str, common_pb2.ModelInfo] = field(default_factory=dict)
    last_error: str = "not checked yet"
    stats: decoder_pb2.DecoderStatsResponse | None = None  # decoders: from the health loop
    slow_checks: int = 0  # consecutive health checks that ran past their deadline


class BackendPools:
    def __init__(
        self,
        encoders: list[str],
        decoders: list[str],
        *,
        interval: float = 2.0,
        check_timeout: float = 1.0,
    ) -> None:
        self.configured = {"encoder": list(encoders), "decoder": list(decoders)}
        self.interval = interval
        self.check_timeout = check_timeout
        self.backends: list[Backend] = []
        self._rr = {"encoder": itertools.count(), "decoder": itertools.count()}
        self._task: asyncio.Task[None] | None = None

    def _make(self, kind: str, address: str, configured_as: str) -> Backend:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub_cls = (
            encoder_pb2_grpc.EncoderStub if kind == "encoder" else decoder_pb2_grpc.DecoderStub
        )
        return Backend(
            kind,
            address,
            configured_as,
            channel,
            stub_cls(channel),
            health_pb2_grpc.HealthStub(channel),
        )

    async def _sync_addresses(self) -> None:
        """(Re-)expand every configured address; add new hosts, drop vanished ones."""
        wanted: list[tuple[str, str, str]] = []
        for kind, addresses in self.configured.items():
            for configured in addresses:
                for addr in await asyncio.to_thread(expand_address, configured):
                    wanted.append((kind, addr, configured))
        have = {(b.kind, b.address): b for b in self.backends}
        keep: list[Backend] = []
        for kind, addr, configured in wanted:
            backend = have.pop((kind, addr), None) or self._make(kind, addr, configured)
            if all(b is not backend for b in keep):
                keep.append(backend)
        for gone in have.values():
            await gone.channel.close()
        self.backends = keep

    async def start(self) -> None:
        await self._sync_addresses()
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="backend-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for b in self.backends:
            await b.channel.close()

    async def _loop(self) -> None:
        for tick in itertools.count(1):
            await asyncio.sleep(self.interval)
            try:
                if tick % RERESOLVE_EVERY == 0:
                    await self._sync_addresses()
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("health_loop_failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def check(self, b: Backend) -> None:
        was = b.healthy
        try:
            resp = await b.health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout
            )
            serving = resp.status == health_pb2.HealthCheckResponse.SERVING
            b.last_error = (
                "" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            )
            if serving and (not was or not b.models):
                listed = await b.stub.ListModels(
                    common_pb2.ListModelsRequest(), timeout=self.check_timeout * 5
                )
                b.models = {m.id: m for m in listed.models}
        except grpc.aio.AioRpcError as err:
            b.last_error = f"{err.code().name}: {err.details()}"
            # A busy host can miss one deadline; only NOT_SERVING, a refused connection or
            # SLOW_CHECKS_DOWN late answers in a row take a healthy backend out.
            late = err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            b.slow_checks = b.slow_checks + 1 if late else 0
            serving = was and late and b.slow_checks < SLOW_CHECKS_DOWN
        else:
            b.slow_checks = 0
        b.healthy = serving
        if b.kind == "decoder":
            await self._poll_stats(b)
        if was != serving:
            log.info(
                "backend_health",
                kind=b.kind,
                address=b.address,
                healthy=serving,
                reason=b.last_error,
                models=sorted(b.models),
            )

    async def _poll_stats(self, b: Backend) -> None:
        """The decoder engine's own numbers (batch, queue, KV) for /metrics; best effort: a
        decoder without Stats (or a failed call) just reports nothing."""
        b.stats = None
        if not b.healthy:
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            b.stats = await b.stub.Stats(
                decoder_pb2.DecoderStatsRequest(), timeout=self.check_timeout
            )

    def mark_down(self, b: Backend, reason: str) -> None:
        """A call failed with UNAVAILABLE: skip this backend until a health check passes."""
        if b.healthy:
            log.warning("backend_down", kind=b.kind, address=b.address, reason=reason)
        b.healthy = False
        b.last_error = reason

    def candidates(self, kind: str, model: str) -> list[Backend]:
        """Healthy backends of `kind` serving `model`, rotated round-robin."""
        pool = [b for b in self.backends if b.kind == kind and b.healthy and model in b.models]
        if not pool:
            return []
        start = next(self._rr[kind]) % len(pool)
        return pool[start:] + pool[:start]

    def models(self) -> dict[str, common_pb2.ModelInfo]:
        """Every model a decoder serves (healthy or not), modalities merged with the encoders'."""
        merged: dict[str, common_pb2.ModelInfo] = {}
        for b in sorted(self.backends, key=lambda b: b.kind != "decoder"):
            for mid, info in b.models.items():
                if b.kind == "decoder" and mid not in merged:
                    merged[mid] = common_pb2.ModelInfo()
                    merged[mid].CopyFrom(info)
                elif mid in merged:
                    have = set(merged[mid].modalities)
                    merged[mid].modalities.extend(m for m in info.modalities if m not in have)
                    merged[mid].random_weights |= info.random_weights
        return merged

    def modality_names(self, info: common_pb2.ModelInfo) -> list[str]:
        names = {PROTO_TO_MODALITY.get(m) for m in info.modalities} | {"text"}
        order = list(PROTO_TO_MODALITY.values())
        return sorted((n for n in names if n), key=order.index)

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "kind": b.kind,
                "address": b.address,
                "configured_as": b.configured_as,
                "healthy": b.healthy,
                "models": sorted(b.models),
                "error": b.last_error or None,
            }
            for b in self.backends
        ]

    def ready(self) -> tuple[bool, list[str]]:
        """(every backend SERVING and at least one decoder, reasons it is not)."""
        down = [
            f"{b.kind} {b.address}: {b.last_error or 'down'}"
            for b in self.backends
            if not b.healthy
        ]
        if not any(b.kind == "decoder" for b in self.backends):
            down.append("no decoder configured")
        return not down, down
