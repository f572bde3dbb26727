"""The one thread that runs the model: the completions in progress decoded together, one step at a time
(kr3.decoder.Batch), with every other model call (scoring, next tokens) run between two steps in the order it is
asked for; the count of requests using it (bounded by serve.max_active); a completion's pieces streamed from it,
which stops when its client leaves."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future

from fastapi.responses import StreamingResponse

from kr3.decoder import Batch
from kr3.sampling import Generation
from kr3.serve.protocol import ApiError

log = logging.getLogger(__name__)


class ModelThread:
    """The one thread that runs the model (see the module), and the count of requests using it."""

    def __init__(self, batch: Callable[[], Batch], max_active: int):
        self.new_batch, self.batch = batch, None
        self.max_active, self.active = max_active, 0
        self.work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.listeners: dict[Generation, Callable[[], None]] = {}
        self.thread = threading.Thread(target=self.run, name="kr3-model", daemon=True)
        self.thread.start()

    def run(self) -> None:
        self.batch = self.new_batch()
        while True:
            try:
                job = self.work.get(block=not self.batch.busy)
            except queue.Empty:
                job = lambda: None  # noqa: E731 — nothing asked for: decode
            while job is not None:
                job()
                try:
                    job = self.work.get_nowait()
                except queue.Empty:
                    break
            else:
                return  # close()
            if self.batch.busy:
                self.step()

    def step(self) -> None:
        """One step of the batch; each completion it moved on hears of it. A bug in the step fails every completion
        in the batch, which starts again empty."""
        try:
            stepped = self.batch.step()
        except Exception as e:  # noqa: BLE001 — each completion's response says so; the traceback goes to the log
            log.exception("decoding failed")
            stepped = [*self.batch.active, *self.batch.joining]
            for g in stepped:
                g.failed = e
                g.end()
            self.batch = self.new_batch()
        for g in stepped:
            if g in self.listeners:
                try:
                    self.listeners[g]()
                except RuntimeError:  # its event loop has closed (the server stopped): nobody listens
                    self.listeners.pop(g)

    async def call(self, fn: Callable, *args):
        """fn(*args) on the model thread, between two steps, after every call asked for before it."""
        future: Future = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 — raised where it was asked for
                    future.set_exception(e)

        self.work.put(job)
        return await asyncio.wrap_future(future)

    async def decode(self, make: Callable[[], Generation],
                     gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[str | dict]:
        """The items of a completion (made by `make` on the model thread) as the batch decodes them: its pieces of text,
        then its stats. Ends with Disconnected once `gone()` says the client has left; a stream needs no `gone`:
        Starlette cancels it then. However it ends, the completion leaves the batch."""
        loop, arrived = asyncio.get_running_loop(), asyncio.Queue()

        def join() -> Generation:
            g = make()
            # taken on the model thread, which makes them: whole lists of items cross to the event loop
            self.listeners[g] = lambda: loop.call_soon_threadsafe(arrived.put_nowait, (g.taken(), g.done, g.failed))
            self.batch.join(g)
            return g

        g = await self.call(join)
        try:
            while True:
                items, done, failed = await arrived.get()
                for item in items:
                    yield item
                if failed:
                    raise failed
                if done:
                    return
                if gone and await gone():
                    raise Disconnected
        finally:
            self.work.put(lambda: self.leave(g))

    def leave(self, g: Generation) -> None:
        self.listeners.pop(g, None)
        if not g.done:
            self.batch.leave(g)

    def admit(self) -> None:
        """A place for one more request (`release` gives it back), or 429 when `max_active` are in progress."""
        if self.active >= self.max_active:
            raise ApiError(429, f"the server is busy: {self.max_active} requests are in progress (serve.max_active) — "
                                "retry in a moment", kind="server_busy", code="server_busy")
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    def close(self) -> None:
        self.work.put(None)


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
