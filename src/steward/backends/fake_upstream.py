"""A fast, scriptable fake OpenAI-compatible upstream, for the `openai` backend's tests and benchmarks.

Why it exists: the backend's retry, fallback, circuit-breaker and streaming code must be tested over
real HTTP on loopback (a mocked transport would not exercise connection pooling, chunked transfer or a
peer that drops the connection), and the gateway benchmark needs an upstream that is never the
bottleneck. It is built on `aiohttp.web` (with uvloop when run as a program), answers in microseconds
and serves several thousand requests per second on one core.

Routes: `GET /v1/models`, `POST /v1/chat/completions` (JSON, and SSE when `stream` is true, honouring
`stream_options.include_usage`), `POST /v1/completions` (same), `POST /v1/embeddings`.
Answers are deterministic: the reply is `reply_text` (default "Hello from the fake upstream."), cut
to `max_tokens` words when given; one SSE chunk per word.

Scripted faults (a FIFO queue; each request to a model route pops at most one fault):

* `status` — answer with that HTTP status and an OpenAI error body (`retry_after` adds the header).
* `delay` — sleep `seconds` before answering normally.
* `hang` — never answer (until the client gives up).
* `drop` — close the connection: before any byte (`after_chunks=0`) or mid-stream after N chunks.
* `malformed` — answer 200 with a body that is not JSON (or, for streams, a bad `data:` line).
* `no_usage` — answer normally but without `usage` (stream: no usage chunk), to test estimation.
* `no_done` — stream without the final `data: [DONE]` (a truncated stream).
* `trickle` — stream one chunk at a time, `seconds` apart (a slow model; for client-disconnect tests).
* `error_event` — stream `after_chunks` chunks, then `data: {"error": {...}}` (as vLLM does when the
  engine fails mid-generation).

In-process use (tests):  `async with FakeUpstream() as up: up.fail(500, times=2); ... up.url`.
Out-of-process use (benchmarks): `python -m steward.backends.fake_upstream --port P`; faults can
then be queued with `POST /_control/faults` (a JSON fault or list of faults), cleared with
`DELETE /_control/faults`, and `GET /_control/stats` returns request counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

JSON = dict[str, Any]
ECHO = "{echo}"  # reply_text that makes the fake repeat the last message it received

FaultKind = Literal[
    "status", "delay", "hang", "drop", "malformed", "no_usage", "no_done", "error_event", "trickle"
]


@dataclass
class Fault:
    """One scripted misbehaviour; `path` restricts it to one route (None = any model route)."""

    kind: FaultKind
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    after_chunks: int = 0
    message: str = "scripted failure"
    path: str | None = None

    @classmethod
    def from_json(cls, d: JSON) -> Fault:
        return cls(
            kind=d["kind"],
            status=int(d.get("status", 500)),
            retry_after=None if d.get("retry_after") is None else str(d["retry_after"]),
            seconds=float(d.get("seconds", 0.0)),
            after_chunks=int(d.get("after_chunks", 0)),
            message=str(d.get("message", "scripted failure")),
            path=d.get("path"),
        )


@dataclass
class Seen:
    """What the fake received, for assertions (the body exactly as parsed, headers lower-cased)."""

    path: str
    body: JSON | None
    headers: dict[str, str]
    at: float


@dataclass
class FakeUpstream:
    """The fake server; an async context manager that listens on a free loopback port."""

    models: list[str] = field(default_factory=lambda: ["fake-model", "fake-embed"])
    reply_text: str = "Hello from the fake upstream."
    host: str = "127.0.0.1"
    port: int = 0
    record: bool = True  # keep every request in `seen` (off for benchmarks)
    embedding_dim: int = 8
    max_model_len: int | None = 4096

    def __post_init__(self) -> None:
        self.faults: deque[Fault] = deque()
        self.seen: list[Seen] = []
        self.counts: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": m,
                        "object": "model",
                        "created": 0,
                        "owned_by": "fake",
                        **({"max_model_len": self.max_model_len} if self.max_model_len else {}),
                    }
                    for m in self.models
                ],
            }
        ).encode()

    # ---- scripting -------------------------------------------------------------------------------

    def add(self, fault: Fault, times: int = 1) -> None:
        """Queue `fault` for the next `times` matching requests."""
        for _ in range(times):
            self.faults.append(fault)

    def fail(
        self,
        status: int = 500,
        *,
        times: int = 1,
        retry_after: str | float | None = None,
        path: str | None = None,
    ) -> None:
        ra = None if retry_after is None else str(retry_after)
        self.add(Fault("status", status=status, retry_after=ra, path=path), times)

    def clear(self) -> None:
        self.faults.clear()

    def attempts(self, path: str = "/v1/chat/completions") -> int:
        """How many requests reached `path` so far (faulted or not)."""
        return self.counts.get(path, 0)

    @property
    def url(self) -> str:
        """Base URL in the form the openai SDK and the `openai` backend expect (ends in /v1)."""
        return f"http://{self.host}:{self.port}/v1"

    # ---- lifecycle -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/_control/faults", self._control_add)
        app.router.add_delete("/_control/faults", self._control_clear)
        app.router.add_get("/_control/stats", self._control_stats)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- request handling ------------------------------------------------------------------------

    async def _begin(self, request: web.Request) -> tuple[JSON | None, Fault | None]:
        """Parse the body, record the request, pop the fault that applies to it."""
        path = request.path
        self.counts[path] = self.counts.get(path, 0) + 1
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if self.record:
            self.seen.append(
                Seen(path, body, {k.lower(): v for k, v in request.headers.items()}, time.time())
            )
        fault = None
        if self.faults and (self.faults[0].path is None or self.faults[0].path == path):
            fault = self.faults.popleft()
        return (body if isinstance(body, dict) else None), fault

    async def _pre_fault(
        self, request: web.Request, body: JSON | None, fault: Fault | None
    ) -> web.StreamResponse | None:
        """Apply the faults that act before any answer; return a response to send instead, if any."""
        if body is None:
            return _error(400, "body is not a JSON object", "invalid_request_error")
        if fault is None:
            return None
        if fault.kind == "status":
            headers = {"retry-after": fault.retry_after} if fault.retry_after is not None else None
            etype = "rate_limit_error" if fault.status == 429 else "server_error"
            if 400 <= fault.status < 500 and fault.status != 429:
                etype = "invalid_request_error"
            return _error(fault.status, fault.message, etype, headers=headers)
        if fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
        elif fault.kind == "hang":
            await asyncio.sleep(3600)
        elif fault.kind == "drop" and fault.after_chunks == 0:
            _abort(request)
            return web.Response(status=500)  # never reaches the peer
        return None

    def _words(self, body: JSON) -> list[str]:
        text = self.reply_text
        if text == ECHO:
            # Echo the last message (or the prompt): lets tests see what the gateway forwarded.
            msgs = body.get("messages")
            if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
                text = str(msgs[-1].get("content") or "")
            else:
                prompt = body.get("prompt")
                text = prompt if isinstance(prompt, str) else str(prompt)
        words = text.split(" ")
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and limit > 0:
            words = words[:limit]
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body, fault = await self._begin(request)
        early = await self._pre_fault(request, body, fault)
        if early is not None or body is None:
            return early or web.Response(status=400)
        model = str(body.get("model", "fake-model"))
        words = self._words(body)
        prompt_tokens = _rough_tokens(body.get("messages") if chat else body.get("prompt"))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        created = int(time.time())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake{self.counts.get(request.path, 0)}"
        kind = fault.kind if fault is not None else None

        if not body.get("stream"):
            if kind == "malformed":
                return web.Response(body=b'{"id": "x", "choices": [', content_type="application/json")
            text = "".join(words)
            choice: JSON
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length" if len(words) < len(self.reply_text.split(" ")) else "stop",
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            out: JSON = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if kind != "no_usage":
                out["usage"] = usage
            return web.Response(body=json.dumps(out).encode(), content_type="application/json")

        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": model}
        chunks: list[JSON] = []
        if chat:
            chunks.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for w in words:
                chunks.append(
                    {**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                )
            chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        else:
            for w in words:
                chunks.append({**base, "choices": [{"index": 0, "text": w, "finish_reason": None}]})
            chunks.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if include_usage and kind != "no_usage":
            chunks.append({**base, "choices": [], "usage": usage})
        payload = bytearray()
        for i, c in enumerate(chunks):
            if kind == "drop" and fault is not None and i == fault.after_chunks:
                await resp.write(bytes(payload))
                await asyncio.sleep(0.01)  # let the bytes leave before the reset
                _abort(request)
                return resp
            if kind == "error_event" and fault is not None and i == fault.after_chunks:
                err = {"error": {"message": fault.message, "type": "server_error", "code": 500}}
                payload += b"data: " + json.dumps(err).encode() + b"\n\n"
                break
            if kind == "malformed" and i == 1:
                payload += b"data: {not json\n\n"
                continue
            payload += b"data: " + json.dumps(c).encode() + b"\n\n"
            if kind is not None:  # faults flush chunk by chunk so the client sees them arrive
                await resp.write(bytes(payload))
                payload.clear()
                if kind == "trickle" and fault is not None:
                    await asyncio.sleep(fault.seconds)
        if kind != "no_done":
            payload += b"data: [DONE]\n\n"
        await resp.write(bytes(payload))
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        early = await self._pre_fault(request, body, fault)
        if early is not None or body is None:
            return early or web.Response(status=400)
        if fault is not None and fault.kind == "malformed":
            return web.Response(body=b"<html>oops</html>", content_type="application/json")
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data = []
        for i, item in enumerate(items):
            seed = sum(str(item).encode()) % 997
            vec = [((seed * (j + 1)) % 101) / 101.0 for j in range(self.embedding_dim)]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = _rough_tokens(inputs)
        out = {
            "object": "list",
            "data": data,
            "model": body.get("model", "fake-embed"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.Response(body=json.dumps(out).encode(), content_type="application/json")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.counts[request.path] = self.counts.get(request.path, 0) + 1
        return web.Response(body=self._models_body, content_type="application/json")

    async def _control_add(self, request: web.Request) -> web.StreamResponse:
        spec = await request.json()
        for d in spec if isinstance(spec, list) else [spec]:
            self.add(Fault.from_json(d), int(d.get("times", 1)))
        return web.json_response({"queued": len(self.faults)})

    async def _control_clear(self, request: web.Request) -> web.StreamResponse:
        self.clear()
        return web.json_response({"queued": 0})

    async def _control_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"counts": self.counts, "queued": len(self.faults)})


def _error(status: int, message: str, etype: str, *, headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-shaped error response."""
    body = json.dumps({"error": {"message": message, "type": etype, "param": None, "code": None}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def _abort(request: web.Request) -> None:
    """Reset the connection (what a crashed upstream looks like to its client)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _rough_tokens(value: Any) -> int:
    """A stand-in token count: whitespace-separated words of every string inside `value`."""
    if value is None:
        return 0
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_rough_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_rough_tokens(v) for v in value.values()) + 3
    return 1


async def _serve_forever(up: FakeUpstream) -> None:
    async with up:
        print(f"fake upstream on {up.url}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Serve the fake upstream until interrupted (uvloop when available, no request recording)."""
    parser = argparse.ArgumentParser(description="A fast fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--models", default="fake-model,fake-embed", help="comma-separated model ids")
    parser.add_argument("--reply", default="Hello from the fake upstream.")
    args = parser.parse_args(argv)
    up = FakeUpstream(
        models=args.models.split(","), reply_text=args.reply, host=args.host, port=args.port, record=False
    )
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(_serve_forever(up))


if __name__ == "__main__":
    main()
