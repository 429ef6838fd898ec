"""`EventStreamResponse` at its edges: a stream that ends before its first event still lets the
event generator clean up (settle limits, write the audit record), whatever ended it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from steward.gateway.sse import EventStreamResponse


def _events(log: list[str]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        try:
            log.append("started")
            await asyncio.sleep(5)  # an upstream that has not answered yet
            yield b"data: late\n\n"
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append("cleanup")

    return gen()


async def _never_disconnects() -> dict[str, object]:
    await asyncio.sleep(60)
    return {"type": "http.request"}


@pytest.mark.parametrize("failure", [asyncio.CancelledError, ConnectionResetError])
def test_a_stream_ended_at_the_first_send_still_cleans_up(failure: type[BaseException]) -> None:
    log: list[str] = []

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            raise failure()

    async def main() -> None:
        response = EventStreamResponse(_events(log))
        with pytest.raises(failure):
            await response({"type": "http"}, _never_disconnects, send)  # type: ignore[arg-type]

    asyncio.run(main())
    assert log == ["started", "cancelled", "cleanup"]


def test_a_client_gone_before_any_event_cancels_the_generator() -> None:
    log: list[str] = []
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def main() -> None:
        await EventStreamResponse(_events(log))({"type": "http"}, receive, send)  # type: ignore[arg-type]

    asyncio.run(main())
    assert log == ["started", "cancelled", "cleanup"]
    assert [m["type"] for m in sent] == ["http.response.start"]


def test_events_ready_together_leave_in_one_write() -> None:
    sent: list[dict[str, object]] = []

    async def burst() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"data: %d\n\n" % i

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def main() -> None:
        await EventStreamResponse(burst())({"type": "http"}, _never_disconnects, send)  # type: ignore[arg-type]

    asyncio.run(main())
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) == 1 and bodies[0]["more_body"] is False
    assert bodies[0]["body"] == b"".join(b"data: %d\n\n" % i for i in range(5))
