"""Events from the engine thread to the event loop(s), one wake-up per step.

`RequestHandle.push` costs a `call_soon_threadsafe` (a self-pipe write and an event-loop wake)
per event; with a batch that is one per row per token. The engine instead queues a step's
events here and `flush` hands each loop all of its events in one call.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from services.decoder.types import Delta, Finish, RequestHandle

Event = Delta | Finish


class Outbox:
    def __init__(self) -> None:
        self._items: list[tuple[RequestHandle, Event]] = []

    def add(self, handle: RequestHandle, event: Event) -> None:
        self._items.append((handle, event))

    def flush(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = defaultdict(
            list
        )
        for handle, event in self._items:
            by_loop[handle.loop].append((handle, event))
        self._items = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancel()


def _deliver(items: list[tuple[RequestHandle, Event]]) -> None:
    for handle, event in items:
        handle.deliver(event)
