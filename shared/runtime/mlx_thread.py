"""The one thread a process runs MLX work on.

Since mlx 0.31.2 streams are thread-local: a lazy array built on one thread cannot be evaluated
on another ("There is no Stream(cpu, 0) in current thread"), and MLX is not re-entrant anyway.
So a service loads its models and runs every forward pass on this single worker thread; other
threads (the asyncio loop) only touch arrays that are already evaluated, or evaluate what they
built themselves (e.g. a dtype view made while deserialising).

A thread that used MLX must call `mx.clear_streams()` before it ends, or the process may abort
at exit ("terminate called without an active exception"; ml-explore/mlx#3126, #3395). The worker
does so when stopped, which happens at interpreter exit at the latest.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import mlx.core as mx

T = TypeVar("T")


class MLXWorker:
    """A daemon thread running submitted callables one after another."""

    def __init__(self, name: str = "mlx") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        if self._stopped:
            raise RuntimeError("the MLX worker has stopped")
        future: Future[T] = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued jobs, release this thread's MLX streams, end the thread."""
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                future, fn, args, kwargs = job
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                    future.set_exception(exc)
        finally:
            mx.clear_streams()


_lock = threading.Lock()
_worker: MLXWorker | None = None


def worker() -> MLXWorker:
    """The process-wide MLX worker (started on first use, stopped at exit)."""
    global _worker
    with _lock:
        if _worker is None:
            _worker = MLXWorker()
            atexit.register(_shutdown)
        return _worker


def submit(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    return worker().submit(fn, *args, **kwargs)


def run_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run on the MLX thread and wait (for start-up code and tests, not the event loop)."""
    return submit(fn, *args, **kwargs).result()


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run on the MLX thread without blocking the event loop."""
    return await asyncio.wrap_future(submit(fn, *args, **kwargs))


def _shutdown() -> None:
    if _worker is not None:
        _worker.stop(timeout=10)  # a job still running past this is abandoned (daemon thread)
    mx.clear_streams()  # the main thread's own streams (e.g. arrays it deserialised)
