"""`Stack`: cache, encoders, decoders and the gateway as subprocesses on loopback ports.

    with Stack(StackConfig(model="Qwen/Qwen2.5-VL-3B-Instruct")) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="-")

Start order follows the dependencies (cache; then encoders and decoders, loading in parallel;
then the gateway), each waited for through its health check. Stop order is the reverse
(gateway first, so no new work arrives while the backends drain).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.launcher.probes import (
    SERVING,
    StackError,
    connect_host,
    grpc_health,
    http_status,
    port_taken,
    wait_until,
)
from services.launcher.process import Child, stop_all
from shared.rpc.ports import free_port

Component = Literal["cache", "encoder", "decoder", "gateway"]
BACKENDS: tuple[Component, ...] = ("encoder", "decoder")
MODULES = {c: f"services.{c}" for c in ("cache", "encoder", "decoder", "gateway")}


@dataclass
class StackConfig:
    """What to run. Ports: 0 picks a free one; with N replicas, replica i gets port + i."""

    model: str
    with_encoder: bool = True  # False for text-only models (an encoder would refuse them)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    gateway_port: int = 0
    cache_port: int = 0
    encoder_port: int = 0
    decoder_port: int = 0
    num_encoders: int = 1
    num_decoders: int = 1
    cache_disk_path: str | None = None
    cache_memory_mb: int | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    grace: float = 5.0  # passed to the gRPC services as --grace
    log_level: str = "INFO"
    api_key: str | None = None  # the gateway requires it (its /ready probe too)
    log_dir: Path | None = None  # None: children write to the launcher's terminal
    env: dict[str, str] = field(default_factory=dict)  # on top of os.environ
    # Extra flags, e.g. gateway_args=["--allowed-local-media-path", "/data"].
    cache_args: list[str] = field(default_factory=list)
    encoder_args: list[str] = field(default_factory=list)
    decoder_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    # What the gateway gets as --decoder instead of the stack's own decoders (tests put
    # fault-injecting proxies in front of them); None: the decoders this stack starts.
    gateway_decoders: list[str] | None = None
    startup_timeout: float = 600.0  # Hub downloads and big checkpoints take a while
    # component -> module run with `python -m` (tests substitute stand-ins).
    modules: dict[str, str] = field(default_factory=lambda: dict(MODULES))


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.ports: dict[str, int] = {}
        self.children: dict[str, list[Child]] = {}
        self._assign_ports()
        self._build_children()

    # ---- addresses -------------------------------------------------------------------------
    def _assign_ports(self) -> None:
        cfg, taken = self.config, set[int]()
        bases = {
            "cache": (cfg.cache_port, 1),
            "encoder": (cfg.encoder_port, cfg.num_encoders if cfg.with_encoder else 0),
            "decoder": (cfg.decoder_port, cfg.num_decoders),
            "gateway": (cfg.gateway_port, 1),
        }
        for name, (base, count) in bases.items():
            for i in range(count):
                port = base + i if base else free_port(connect_host(cfg.host), taken)
                if port in taken and base:
                    raise StackError(f"port {port} ({name}-{i}) is assigned twice; pick others")
                taken.add(port)
                self.ports[f"{name}-{i}"] = port

    def address(self, component: Component, index: int = 0) -> str:
        return f"{connect_host(self.config.host)}:{self.ports[f'{component}-{index}']}"

    def addresses(self, component: Component) -> list[str]:
        return [self.address(component, i) for i in range(len(self.children.get(component, [])))]

    @property
    def gateway_url(self) -> str:
        return f"http://{self.address('gateway')}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url."""
        return self.gateway_url + "/v1"

    def child(self, component: Component, index: int = 0) -> Child:
        return self.children[component][index]

    # ---- command lines ---------------------------------------------------------------------
    def _grpc_common(self, name: str) -> list[str]:
        cfg, port = self.config, str(self.ports[name])
        return ["--host", cfg.host, "--port", port, "--grace", str(cfg.grace)] + [
            "--log-level", cfg.log_level,
        ]  # fmt: skip

    def _model_args(self) -> list[str]:
        cfg = self.config
        args = ["--model", cfg.model, "--cache", self.address("cache")]
        if cfg.served_model_name:
            args += ["--served-model-name", cfg.served_model_name]
        if cfg.dtype:
            args += ["--dtype", cfg.dtype]
        return args

    def _argv(self, component: Component, name: str) -> list[str]:
        cfg = self.config
        if component == "cache":
            argv = ["-m", cfg.modules["cache"], *self._grpc_common(name)]
            if cfg.cache_disk_path:
                argv += ["--disk-path", cfg.cache_disk_path]
            if cfg.cache_memory_mb is not None:
                argv += ["--memory-mb", str(cfg.cache_memory_mb)]
            return argv + cfg.cache_args
        if component == "encoder":
            return ["-m", cfg.modules["encoder"], *self._grpc_common(name), *self._model_args()] + (
                cfg.encoder_args
            )
        if component == "decoder":
            argv = ["-m", cfg.modules["decoder"], *self._grpc_common(name), *self._model_args()]
            if cfg.max_model_len:
                argv += ["--max-model-len", str(cfg.max_model_len)]
            return argv + cfg.decoder_args
        argv = ["-m", cfg.modules["gateway"], "--host", cfg.host, "--port", str(self.ports[name])]
        argv += ["--log-level", cfg.log_level, "--grace", str(cfg.grace)]
        decoders = cfg.gateway_decoders if cfg.gateway_decoders else self.addresses("decoder")
        argv += ["--decoder", ",".join(decoders), "--cache", self.address("cache")]
        if self.children.get("encoder"):
            argv += ["--encoder", ",".join(self.addresses("encoder"))]
        if cfg.api_key:
            argv += ["--api-key", cfg.api_key]
        return argv + cfg.gateway_args

    def _build_children(self) -> None:
        cfg = self.config
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **cfg.env}
        counts = {"cache": 1, "encoder": 0, "decoder": cfg.num_decoders, "gateway": 1}
        if cfg.with_encoder:
            counts["encoder"] = cfg.num_encoders
        for component, count in counts.items():
            self.children[component] = [
                Child(
                    name=f"{component}-{i}",
                    argv=[],
                    env=env,
                    log_path=cfg.log_dir / f"{component}-{i}.log" if cfg.log_dir else None,
                )
                for i in range(count)
            ]
        for component, group in self.children.items():  # argv needs every address first
            for child in group:
                child.argv = self._argv(component, child.name)  # type: ignore[arg-type]

    # ---- lifecycle -------------------------------------------------------------------------
    def all_children(self) -> list[Child]:
        return [c for group in self.children.values() for c in group]

    def _wait_ready(self, component: Component, index: int, deadline: float) -> None:
        child = self.child(component, index)
        if component == "gateway":
            url = self.gateway_url + "/ready"

            def ready() -> bool:
                return http_status(url, api_key=self.config.api_key) == 200
        else:
            address = self.address(component, index)

            def ready() -> bool:
                return grpc_health(address) == SERVING

        wait_until(child.name, ready, child.alive, deadline, child.tail)

    def _start_group(self, components: tuple[Component, ...]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        started = [(c, i) for c in components for i in range(len(self.children[c]))]
        for component, index in started:
            self.child(component, index).start()
        for component, index in started:
            self._wait_ready(component, index, deadline)

    def start(self) -> Stack:
        """Start everything and wait until the gateway is ready; on failure stop all, raise."""
        host = connect_host(self.config.host)
        busy = [f"{n} ({p})" for n, p in self.ports.items() if port_taken(host, p)]
        if busy:
            raise StackError(f"ports already in use: {', '.join(busy)} (another stack running?)")
        try:
            self._start_group(("cache",))
            self._start_group(BACKENDS)
            self._start_group(("gateway",))
        except BaseException:  # StackError, or Ctrl-C during start-up
            self.stop()
            raise
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM in reverse dependency order; SIGKILL what outlives `timeout` per group."""
        timeout = self.config.grace + 5.0 if timeout is None else timeout
        for group in (("gateway",), BACKENDS, ("cache",)):
            stop_all([c for name in group for c in self.children.get(name, [])], timeout)

    def kill(self, component: Component, index: int = 0, sig: int = signal.SIGKILL) -> None:
        """Fault injection: signal one component and wait for it to exit."""
        child = self.child(component, index)
        child.stopping = True
        child.signal(sig)
        if not child.wait(self.config.grace + 5.0):
            child.signal(signal.SIGKILL)
            child.wait(5.0)

    def restart(self, component: Component, index: int = 0) -> None:
        """Stop one component (if running), start it again on the same port, wait healthy."""
        child = self.child(component, index)
        if child.alive():
            self.kill(component, index, signal.SIGTERM)
        child.start()
        self._wait_ready(component, index, time.monotonic() + self.config.startup_timeout)

    def dead(self) -> list[Child]:
        """Children that exited without being asked to."""
        return [c for c in self.all_children() if not c.stopping and c.returncode() is not None]

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
