"""The one thread that runs the model: every model call in the order it is asked for, the count of requests using it
(bounded by serve.max_active), and a completion streamed from it that stops when its client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from fastapi.responses import StreamingResponse

from kr3.serve.protocol import ApiError


class ModelThread:
    """The one thread that runs the model, and the count of requests using it (bounded by `max_active`)."""

    def __init__(self, max_active: int):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kr3-model")
        self.max_active, self.active = max_active, 0

    async def call(self, fn: Callable, *args):
        """fn(*args) on the model thread, after every call asked for before it."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def admit(self) -> None:
        """A place for one more request (`release` gives it back), or 429 when `max_active` are in progress."""
        if self.active >= self.max_active:
            raise ApiError(429, f"the server is busy: {self.max_active} requests are in progress (serve.max_active) — "
                                "retry in a moment", kind="server_busy", code="server_busy")
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    async def iterate(self, generator: Iterator, gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator:
        """The items of a synchronous generator, each made on the model thread; closed however it ends. Ends with
        Disconnected once `gone()` says the client has left; a stream needs no `gone`: Starlette cancels it then
        (and asking would take the disconnect message it waits for)."""
        try:
            while not (gone and await gone()):
                item = await self.call(next, generator, None)
                if item is None:
                    return
                yield item
            raise Disconnected
        finally:
            self.pool.submit(generator.close)  # queued behind a step still running: a running generator cannot close

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Disconnected(Exception):
    """The client closed the connection: its completion stops."""


class EventStream(StreamingResponse):
    """Server-sent events that give back their request's place when the response ends, however it ends."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
