"""The `text/event-stream` response for streamed completions.

Why not Starlette's `StreamingResponse`: it sends every event the generator yields as its own ASGI
message (one trip through each middleware's `send` wrapper and one socket write each) and wraps the
stream in an anyio task group. An upstream that delivers a burst of events in one read (a fast model,
or a network hop that batched them) then costs one write per token. Here a producer task drains the
event generator into a buffer and the writer sends whatever has accumulated each time it wakes:
events that are ready together leave in one write, an event that arrives alone leaves at once (the
writer is woken by the first one), so no event is ever held back waiting for company.

Client disconnect cancels the producer, whose generator then records the request as cancelled; the
response does not return before that record is finished, so a dropped connection never loses its
audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_detached: set[asyncio.Task[None]] = set()  # producers still finishing after their response was cancelled


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        pending: list[bytes] = []
        failure: list[Exception] = []
        finished = False
        started = False
        waiter: asyncio.Future[None] | None = None

        def wake(_: object = None) -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        async def produce() -> None:
            nonlocal finished, started
            started = True
            try:
                async for piece in self.events:
                    pending.append(piece)
                    wake()
            except asyncio.CancelledError:
                pass  # the client left; the generator has recorded that on its way out
            except Exception as exc:  # re-raised by the writer once what came before is sent
                failure.append(exc)
            finally:
                finished = True
                wake()

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        producer: asyncio.Task[None] | None = None
        listener: asyncio.Task[None] | None = None
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            producer = loop.create_task(produce())
            listener = loop.create_task(disconnected())
            listener.add_done_callback(wake)
            while True:
                if not pending and not finished and not listener.done():
                    waiter = loop.create_future()
                    await waiter
                if listener.done():
                    return  # the client is gone: `finally` stops the producer and waits for it
                body = b"".join(pending)
                pending.clear()
                if finished and not failure:
                    # The last events and the end of the body in one write.
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                elif finished:
                    raise failure[0]  # after everything the generator produced before it failed
        finally:
            if listener is not None:
                listener.cancel()
            if producer is None:
                producer = loop.create_task(produce())
            if not started:
                # The stream ended (cancelled, or the first send failed) before the producer's first
                # step. A task cancelled before it runs never starts the generator, and an async
                # generator that never started runs none of its cleanup: the request would be left
                # unsettled and unaudited. One turn of the loop starts it; cancelling it then runs
                # that cleanup like any client disconnect.
                # Cancelled again meanwhile: the producer is still stopped and waited for below.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
            if not producer.done():
                producer.cancel()
            try:
                # Even if this task is cancelled (server shutdown), the producer's cleanup (settling
                # limits, committing the audit record) runs to its end.
                await asyncio.shield(producer)
            except asyncio.CancelledError:
                _detached.add(producer)
                producer.add_done_callback(_detached.discard)
                raise
