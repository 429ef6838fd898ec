"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task and a copy per request).

It gives every request an id, enforces the body size limit while the body streams in, and stamps
every response with `x-request-id` and `x-steward-overhead-ms` (time in Steward, backend excluded).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steward.gateway.errors import APIError, error_body

_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body is larger than the limit of {limit} bytes", code="request_too_large"
        )


Endpoint = Callable[[Request], Awaitable[Response]]


class GatewayMiddleware:
    """`direct` maps (method, path) of the hot inference routes to their endpoints, which are called
    here instead of through the router: the routes stay registered with FastAPI (the OpenAPI document,
    every other path), but a streamed completion no longer pays for the route scan, dependency
    solving and three more wrapper layers around each `send` (~15% of a request's CPU, measured with
    py-spy under `benchmarks/bench_gateway.py`). These endpoints take a bare `Request` and turn every
    error into a response themselves, so nothing the router would add is lost."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, direct: Mapping[tuple[str, str], Endpoint] | None = None
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.direct = dict(direct or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = "req_" + secrets.token_hex(12)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        state["t0"] = t0
        state["backend_s"] = 0.0
        incoming = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        await self._too_large(send, rid, t0)
                        return
                except ValueError:
                    pass
            elif name == b"x-request-id":
                incoming = value.decode("latin-1")
        if incoming and _RID.match(incoming):
            state["client_request_id"] = incoming

        seen = 0
        limit = self.max_body

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def send_stamped(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                overhead = (time.perf_counter() - t0 - state.get("backend_s", 0.0)) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                headers.append((b"x-steward-overhead-ms", f"{max(overhead, 0.0):.3f}".encode()))
                message["headers"] = headers
            await send(message)

        try:
            endpoint = self.direct.get((scope["method"], scope["path"]))
            if endpoint is None:
                await self.app(scope, receive_limited, send_stamped)
            else:
                response = await endpoint(Request(scope, receive_limited))
                await response(scope, receive_limited, send_stamped)
        except BodyTooLarge:
            if not started:
                await self._too_large(send, rid, t0)

    async def _too_large(self, send: Send, rid: str, t0: float) -> None:
        body = orjson.dumps(
            error_body(
                f"request body is larger than the limit of {self.max_body} bytes",
                "invalid_request_error",
                None,
                "request_too_large",
            )
        )
        overhead = (time.perf_counter() - t0) * 1000
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", rid.encode()),
                    (b"x-steward-overhead-ms", f"{overhead:.3f}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
