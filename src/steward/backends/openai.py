"""The `openai` backend: any OpenAI-compatible upstream (vLLM, Ollama, llama.cpp server, OpenAI).

Why each piece is here:

* **HTTP client: aiohttp** with one pooled `TCPConnector` per backend. Chosen by measurement
  (`benchmarks/bench_upstream_client.py`, one in-process loop against the fake upstream on this
  2-core machine): aiohttp did ~2,600 req/s sequential / ~4,000 at 32 concurrent, httpx ~800 / ~400
  (its p99 at 32 concurrent was ~350 ms); streaming 1,600 vs 540 sequential. The client's CPU lands
  on the gateway's event loop, so this is the gateway's throughput ceiling.
* **Timeouts**: `connect_timeout_s` (TCP connect), `read_timeout_s` (longest silence between bytes —
  a stalled upstream), `total_timeout_s` (whole call, stream included; `Call.timeout_s` overrides).
* **Retries** with full-jitter exponential backoff (`uniform(0, min(cap, base·2^attempt))`) on 429,
  5xx, connect errors and timeouts; a `retry-after` / `retry-after-ms` header is honoured (the wait is
  at least that long; a value above `max_retry_after_s` ends retrying at once, reporting it to the
  client). Never on other 4xx (the request is wrong) and **never after the first streamed chunk
  reached the caller** (the caller would see two answers spliced). No retry sleeps past the deadline.
* **Circuit breaker** (`resilience.CircuitBreaker`) per upstream, counted per HTTP attempt.
* **Errors** in the gateway's terms (`BackendError`): an upstream 4xx keeps its status and the
  upstream's message/type/param/code (422 becomes 400, since a client must never see a 422;
  401/403 become 502 — the *gateway's* upstream credentials were refused, not the client's); after
  retries a 429 or 503 becomes 503, 500/502/other 5xx become 502 `upstream_error`, a 504 or a timeout
  becomes 504 `timeout_error`; an unreachable upstream 502. All of these are `retryable`, so a
  `FallbackChain` moves on. A malformed body (not JSON, a truncated stream) is a clean 502, never an
  unhandled exception. Messages name the backend, never the upstream's address or key.
* **Usage**: streams are sent upstream with `stream_options.include_usage=true`, and the last chunk
  handed to the caller always carries `usage`. The gateway settles limits by it, so the upstream's
  usage is checked first (`_reconcile_usage`): the caller always gets `prompt_tokens`,
  `completion_tokens` (not for embeddings) and `total_tokens` as non-negative ints. A count that is
  missing, null, not a whole number, negative, absurd (> 10⁹), or below what the text implies at
  32 bytes a token (a `usage: {}`, or 1 completion token for 500 bytes the client received) is
  replaced by the gateway's estimate — for a count that was merely too low, max(reported,
  estimate) — and the usage is then marked `"estimated": true` (in the usage object the client
  and the trace see, and in `call.metadata["usage_estimated"]`, which the audit event records).
  Estimate: prompt = `count_prompt_tokens` (an upper bound), completion = max(number of
  content-bearing deltas, ⌈UTF-8 bytes / 4⌉): streaming servers send about one token per delta,
  and the byte count covers servers that batch several tokens into one delta.
* **Pass-through**: the request body goes upstream unchanged except `model` (the upstream's name)
  and, for streams, `stream`/`stream_options.include_usage`; `tools`, `response_format` and fields
  Steward does not know pass as they are, and so does the upstream's answer.

Building one from a routing-table entry: `OpenAIBackend.from_config({"name": "vllm-a",
"base_url": "http://10.0.0.5:8000/v1", "api_key": "...", "models": {"llama": "meta-llama/..."}})`;
with no `models` the upstream's `GET /v1/models` is read at `start()` (ids, optionally prefixed).
A list of entries (primary first) becomes a `FallbackChain` through `build_openai_backend`.
The gateway builds each `Call` with `upstream_model=backend.upstream_model(client_model_id)`.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, cast, get_args

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from steward.backends.base import JSON, BackendError, Call, ErrorType, ModelInfo
from steward.backends.resilience import CircuitBreaker, FallbackChain
from steward.surrogates import scrub_surrogates

log = logging.getLogger("steward.backends.openai")

Route = Literal["chat", "completions"]
_ERROR_TYPES: frozenset[str] = frozenset(get_args(ErrorType))
_MEDIA_KEYS = frozenset({"image_url", "input_audio", "file", "image", "audio"})
_MAX_ERROR_BODY = 64 * 1024


class OpenAIBackendConfig(BaseModel):
    """One upstream, as written in the routing table (YAML/env); validated when the gateway starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "openai"
    base_url: str = Field(description="like the openai SDK's: http://host:8000/v1 (a bare host gets /v1)")
    api_key: SecretStr | None = Field(
        default=None, description="sent as `Authorization: Bearer`; never logged"
    )
    models: dict[str, str] = Field(
        default_factory=dict, description="client model id → upstream model id; empty = discover at start"
    )
    model_prefix: str = Field(default="", description="with discovery: client id = prefix + upstream id")
    context_length: dict[str, int] = Field(default_factory=dict, description="client id → context window")
    capabilities: frozenset[str] = frozenset({"chat", "completions", "embeddings"})
    owned_by: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers on every request")

    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)
    total_timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    backoff_base_s: float = Field(default=0.25, ge=0)
    backoff_cap_s: float = Field(default=8.0, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0)
    max_connections: int = Field(default=256, ge=1)
    # Idle pooled connections are dropped after this; below uvicorn's 5 s keep-alive (vLLM serves
    # with uvicorn) so the pool does not reuse a connection the upstream is about to close.
    keepalive_s: float = Field(default=4.0, ge=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, ge=0)

    prompt_bytes_per_token: float = Field(default=3.0, gt=0)
    message_overhead_tokens: int = Field(default=4, ge=0)
    media_part_tokens: int = Field(default=1024, ge=0)

    @field_validator("base_url")
    @classmethod
    def _normalise_base_url(cls, v: str) -> str:
        v = v.rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        if v.count("/") == 2:  # scheme://host[:port] with no path: the OpenAI API lives under /v1
            v += "/v1"
        return v


class UpstreamError(BackendError):
    """A `BackendError` that also tells the retry loop and the breaker what happened.

    `retry_same`: another attempt at the same upstream may succeed (429, 5xx, timeout, connect error).
    `health`: what the answer says about the upstream, for its circuit breaker — "failed" (5xx,
    timeout, unreachable, malformed, dropped), "alive" (it answered coherently: a 4xx, a 429) or
    "unknown" (nothing was learnt, e.g. the deadline ran out before the attempt).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        type: ErrorType = "upstream_error",
        code: str | None = None,
        param: str | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
        retry_same: bool = True,
        health: Literal["failed", "alive", "unknown"] = "failed",
    ) -> None:
        super().__init__(
            message,
            status=status,
            type=type,
            code=code,
            param=param,
            retryable=retryable,
            retry_after=retry_after,
        )
        self.retry_same = retry_same
        self.health = health


class OpenAIBackend:
    """A `Backend` forwarding to one OpenAI-compatible upstream (see the module docstring).

    `sleep`, `rng` and `clock` are injectable so tests can record backoff delays, seed the jitter and
    move the breaker's time without sleeping.
    """

    def __init__(
        self,
        config: OpenAIBackendConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = config.name
        self.breaker = CircuitBreaker(
            config.name,
            failure_threshold=config.breaker_failures,
            cooldown_s=config.breaker_cooldown_s,
            clock=clock,
        )
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._map: dict[str, str] = dict(config.models)
        self._context: dict[str, int] = dict(config.context_length)
        self._headers = {"content-type": "application/json", **config.headers}
        if config.api_key is not None:
            self._headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"

    @classmethod
    def from_config(cls, entry: dict[str, Any] | OpenAIBackendConfig, **kwargs: Any) -> OpenAIBackend:
        """Build from a routing-table entry (a mapping validated as `OpenAIBackendConfig`)."""
        cfg = entry if isinstance(entry, OpenAIBackendConfig) else OpenAIBackendConfig.model_validate(entry)
        return cls(cfg, **kwargs)

    def __repr__(self) -> str:  # no key, no address: this ends up in logs
        return f"OpenAIBackend(name={self.name!r}, models={sorted(self._map)!r})"

    # ---- lifecycle -------------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_connections,
                keepalive_timeout=self.config.keepalive_s,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"user-agent": "steward-gateway"}, trust_env=False
            )
        return self._session

    async def start(self) -> None:
        """Open the connection pool; with no `models` configured, read the upstream's model list."""
        self._get_session()
        if not self._map:
            await self._discover()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _discover(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=self.config.connect_timeout_s + self.config.read_timeout_s,
            sock_connect=self.config.connect_timeout_s,
        )
        try:
            async with self._get_session().get(
                f"{self.config.base_url}/models", headers=self._headers, timeout=timeout
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise _error_from_status(self.name, resp.status, raw, resp.headers)
        except BackendError as e:
            raise BackendError(
                f"cannot list the models of upstream {self.name!r}: {e.message}", status=502
            ) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise BackendError(
                f"cannot list the models of upstream {self.name!r}: {_transport_error(self.name, e).message}",
                status=502,
            ) from e
        data = _loads_object(raw)
        entries = data.get("data") if data is not None else None
        if not isinstance(entries, list):
            raise BackendError(f"upstream {self.name!r} answered GET /models with no model list", status=502)
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            client_id = self.config.model_prefix + entry["id"]
            self._map[client_id] = entry["id"]
            for key in ("max_model_len", "context_length", "context_window"):
                if isinstance(entry.get(key), int) and client_id not in self._context:
                    self._context[client_id] = entry[key]

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=client_id,
                backend="openai",
                context_length=self._context.get(client_id),
                owned_by=self.config.owned_by or self.name,
                capabilities=self.config.capabilities,
            )
            for client_id in self._map
        ]

    def upstream_model(self, model_id: str) -> str:
        """The upstream's name for the client-facing `model_id` (unknown ids pass as they are)."""
        return self._map.get(model_id, model_id)

    # ---- token estimate --------------------------------------------------------------------------

    def count_prompt_tokens(self, route: Route, call: Call) -> int:
        """An upper-bound estimate of prompt tokens, cheap enough to run on every request.

        Text costs ⌈UTF-8 bytes / `prompt_bytes_per_token`⌉ (default 3: English BPE averages ~4
        bytes per token, code ~3; lower it for scripts that tokenise worse). Chat adds
        `message_overhead_tokens` per message (role, separators) plus 3 for the reply's priming;
        `tools`/`functions`/`response_format` count as their JSON text (the upstream renders them
        into the prompt); a media part (image, audio, file) counts `media_part_tokens` whatever its
        size, since a base64 data URL's bytes say nothing about its tokens. Token-id prompts count
        one per id. The gateway reserves this plus `max_tokens`, and settles to the real usage.
        """
        body = call.body
        bpt = self.config.prompt_bytes_per_token
        n_bytes = 0
        tokens = 0
        if route == "chat":
            messages = body.get("messages")
            if isinstance(messages, list):
                tokens += 3
                for m in messages:
                    tokens += self.config.message_overhead_tokens
                    b, t = self._measure(m)
                    n_bytes += b
                    tokens += t
            for key in ("tools", "functions", "response_format"):
                if body.get(key) is not None:
                    n_bytes += len(json.dumps(body[key], ensure_ascii=False).encode())
        else:
            for key in ("prompt", "suffix"):
                b, t = self._measure(body.get(key))
                n_bytes += b
                tokens += t
        return tokens + math.ceil(n_bytes / bpt)

    def _prompt_bounds(self, route: Route, call: Call, body: JSON | None = None) -> _Prompt:
        """What the gateway knows of the prompt's tokens, to check an upstream's `prompt_tokens` by.

        The estimate is `count_prompt_tokens` (an upper bound), computed only when it is needed.
        The floor is what no tokenizer goes below: ⌈bytes / `_MAX_BYTES_PER_TOKEN`⌉ of the text
        every server puts in the prompt — the messages' content (not tools or `response_format`,
        which some servers render and others only constrain decoding by), or the completion
        prompt — and less when the request asks the upstream to truncate the prompt (vLLM's
        `truncate_prompt_tokens`). `body`: the request, when `call` is a stand-in built to measure
        part of it (embeddings' input).
        """
        if route == "chat":
            messages = call.body.get("messages")
            contents = (
                [m.get("content") for m in messages if isinstance(m, dict)]
                if isinstance(messages, list)
                else []
            )
            n_bytes = sum(_content_bytes(c) for c in contents)
        else:
            n_bytes = self._measure(call.body.get("prompt"))[0]
        floor = math.ceil(n_bytes / max(_MAX_BYTES_PER_TOKEN, self.config.prompt_bytes_per_token))
        truncate = (call.body if body is None else body).get("truncate_prompt_tokens")
        if isinstance(truncate, int) and not isinstance(truncate, bool) and truncate >= 0:
            floor = min(floor, truncate)
        return _Prompt(functools.cache(lambda: self.count_prompt_tokens(route, call)), floor)

    def _measure(self, value: Any) -> tuple[int, int]:
        """(UTF-8 bytes of text, tokens counted directly) inside a message/prompt value."""
        if isinstance(value, str):
            return (len(value) if value.isascii() else len(value.encode("utf-8", "replace"))), 0
        if isinstance(value, bool) or value is None:
            return 0, 0
        if isinstance(value, int):  # a token id
            return 0, 1
        n_bytes = tokens = 0
        if isinstance(value, list):
            for v in value:
                b, t = self._measure(v)
                n_bytes += b
                tokens += t
        elif isinstance(value, dict):
            for k, v in value.items():
                if k in _MEDIA_KEYS:
                    tokens += self.config.media_part_tokens
                elif k != "role" and k != "type":
                    b, t = self._measure(v)
                    n_bytes += b
                    tokens += t
        return n_bytes, tokens

    # ---- public calls ----------------------------------------------------------------------------

    async def chat(self, call: Call) -> JSON:
        result = await self._post_json("/chat/completions", call, self._body(call, stream=False))
        self._ensure_usage(result, "chat", call)
        return result

    async def completion(self, call: Call) -> JSON:
        result = await self._post_json("/completions", call, self._body(call, stream=False))
        self._ensure_usage(result, "completions", call)
        return result

    async def embeddings(self, call: Call) -> JSON:
        result = await self._post_json("/embeddings", call, self._body(call, stream=None))
        prompt = self._prompt_bounds(
            "completions", Call({"prompt": call.body.get("input")}, "", ""), call.body
        )
        result["usage"] = _reconcile_usage(result.get("usage"), prompt, None)
        _note_estimated(call, result["usage"])
        return result

    def chat_stream(self, call: Call) -> AsyncIterator[JSON]:
        return self._stream("/chat/completions", "chat", call)

    def completion_stream(self, call: Call) -> AsyncIterator[JSON]:
        return self._stream("/completions", "completions", call)

    # ---- request plumbing ------------------------------------------------------------------------

    def _body(self, call: Call, *, stream: bool | None) -> JSON:
        """The upstream request: the client's body with the upstream model name and stream flags."""
        body = dict(call.body)
        body["model"] = call.upstream_model
        if stream is True:
            body["stream"] = True
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        elif stream is False:
            if "stream" in body:
                body["stream"] = False
            body.pop("stream_options", None)  # upstreams reject it on non-streaming requests
        return body

    def _timeout(self, deadline: float) -> aiohttp.ClientTimeout:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise UpstreamError(
                f"upstream {self.name!r} timed out",
                status=504,
                type="timeout_error",
                retry_same=False,
                health="unknown",
            )
        return aiohttp.ClientTimeout(
            total=remaining, sock_connect=self.config.connect_timeout_s, sock_read=self.config.read_timeout_s
        )

    def _deadline(self, call: Call) -> float:
        return self._clock() + (call.timeout_s or self.config.total_timeout_s)

    def _retry_delay(self, err: UpstreamError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up with `err`."""
        if not err.retry_same or attempt >= self.config.max_retries:
            return None
        delay = self._rng.uniform(
            0.0, min(self.config.backoff_cap_s, self.config.backoff_base_s * 2**attempt)
        )
        if err.retry_after is not None:
            if err.retry_after > self.config.max_retry_after_s:
                return None
            delay = max(delay, err.retry_after)
        if self._clock() + delay >= deadline:
            return None
        return delay

    def _settle(self, err: UpstreamError) -> None:
        if err.health == "failed":
            self.breaker.on_failure()
        elif err.health == "alive":
            self.breaker.on_success()  # it answered coherently (a 4xx, a 429): it is alive
        else:
            self.breaker.on_abandon()

    async def _post_json(self, path: str, call: Call, body: JSON) -> JSON:
        data = _dumps(body)
        url = self.config.base_url + path
        deadline = self._deadline(call)
        attempt = 0
        while True:
            self.breaker.before_call()
            settled = False
            try:
                async with self._get_session().post(
                    url, data=data, headers=self._headers, timeout=self._timeout(deadline)
                ) as resp:
                    raw = await resp.read()
                    if not 200 <= resp.status < 300:
                        raise _error_from_status(self.name, resp.status, raw, resp.headers)
                result = _loads_object(raw)
                if result is None:
                    raise _malformed(self.name, "a response body that is not a JSON object")
                self.breaker.on_success()
                settled = True
                call.metadata["upstream_attempts"] = attempt + 1
                return result
            except (UpstreamError, aiohttp.ClientError, TimeoutError) as e:
                err = e if isinstance(e, UpstreamError) else _transport_error(self.name, e)
                self._settle(err)
                settled = True
                delay = self._retry_delay(err, attempt, deadline)
                call.metadata["upstream_attempts"] = attempt + 1
                if delay is None:
                    raise err from (None if e is err else e)
                log.info(
                    "upstream retry",
                    extra={
                        "backend": self.name,
                        "status": err.status,
                        "attempt": attempt + 1,
                        "delay_s": delay,
                    },
                )
            finally:
                if not settled:
                    self.breaker.on_abandon()
            attempt += 1
            await self._sleep(delay)

    async def _stream(self, path: str, route: Route, call: Call) -> AsyncIterator[JSON]:
        """POST with `stream: true`, parse SSE as it arrives, yield chunk dicts; usage comes last.

        Retries only while nothing has been yielded; after the first chunk any failure is raised
        from the iterator as a `BackendError` (the caller has already forwarded part of an answer).
        """
        data = _dumps(self._body(call, stream=True))
        url = self.config.base_url + path
        deadline = self._deadline(call)
        attempt = 0
        sent = False
        while True:
            self.breaker.before_call()
            settled = False
            try:
                async with self._get_session().post(
                    url, data=data, headers=self._headers, timeout=self._timeout(deadline)
                ) as resp:
                    if resp.status != 200:
                        raw = await resp.read()
                        raise _error_from_status(self.name, resp.status, raw, resp.headers)
                    async for chunk in self._chunks(resp, route, call):
                        sent = True
                        yield chunk
                self.breaker.on_success()
                settled = True
                call.metadata["upstream_attempts"] = attempt + 1
                return
            except (UpstreamError, aiohttp.ClientError, TimeoutError) as e:
                err = e if isinstance(e, UpstreamError) else _transport_error(self.name, e)
                self._settle(err)
                settled = True
                call.metadata["upstream_attempts"] = attempt + 1
                delay = None if sent else self._retry_delay(err, attempt, deadline)
                if delay is None:
                    if sent:  # mid-stream: no other backend can take over a half-sent answer
                        err.retryable = False
                    raise err from (None if e is err else e)
                log.info(
                    "upstream retry",
                    extra={
                        "backend": self.name,
                        "status": err.status,
                        "attempt": attempt + 1,
                        "delay_s": delay,
                    },
                )
            finally:
                if not settled:  # the caller stopped reading (or was cancelled): no verdict
                    self.breaker.on_abandon()
            attempt += 1
            await self._sleep(delay)

    async def _chunks(self, resp: aiohttp.ClientResponse, route: Route, call: Call) -> AsyncIterator[JSON]:
        """SSE → chunk dicts, incrementally; ensures the last chunk yielded carries `usage`."""
        buf = bytearray()
        data_lines: list[bytes] = []
        done = finished = False
        last: JSON | None = None
        last_usage: Any = None  # the upstream's latest usage, as it sent it
        prompt: _Prompt | None = None
        deltas = text_bytes = 0
        async for piece in resp.content.iter_any():
            buf += piece
            end = buf.rfind(b"\n")
            if end < 0:
                continue
            complete = bytes(buf[:end])  # every whole line that arrived, split in one C call
            del buf[: end + 1]
            lines = complete.split(b"\n")
            if b"\r" in complete:
                lines = [ln.rstrip(b"\r") for ln in lines]
            for line in lines:
                if line:
                    if line.startswith(b"data:"):
                        data_lines.append(line[6:] if line.startswith(b"data: ") else line[5:])
                    continue  # comments (":"), `event:`, `id:`, `retry:` carry nothing for us
                if not data_lines:
                    continue
                payload = b"\n".join(data_lines) if len(data_lines) > 1 else data_lines[0]
                data_lines.clear()
                if payload.strip() == b"[DONE]":
                    done = True
                    break
                chunk = _loads_object(payload)
                if chunk is None:
                    raise _malformed(self.name, "a stream event that is not a JSON object")
                if "error" in chunk and not chunk.get("choices"):
                    raise _stream_error(self.name, chunk["error"])
                for choice in chunk.get("choices") or ():
                    if not isinstance(choice, dict):
                        continue
                    n = _choice_text_bytes(choice, route)
                    if n:
                        deltas += 1
                        text_bytes += n
                    if choice.get("finish_reason"):
                        finished = True
                if chunk.get("usage") is not None:
                    # Checked before the caller sees it (it settles limits by the latest usage),
                    # against the text received so far, this chunk's included.
                    last_usage = chunk["usage"]
                    if isinstance(last_usage, dict):
                        if prompt is None:
                            prompt = self._prompt_bounds(route, call)
                        chunk["usage"] = _reconcile_usage(
                            last_usage,
                            prompt,
                            self._stream_completion(route, call, deltas, text_bytes),
                            _completion_ceiling(route, call),
                        )
                    else:  # not a usage object: as if none had come
                        chunk["usage"] = None
                last = chunk
                yield chunk
            if done:
                break
        if not done:  # a last event cut short of its blank line (or newline) still counts if it is [DONE]
            tail_line = bytes(buf).strip()
            pending = [*data_lines, tail_line[5:].strip()] if tail_line.startswith(b"data:") else data_lines
            done = b"\n".join(pending).strip() == b"[DONE]"
        if not done and not finished:
            raise _malformed(self.name, "a stream that ended before its last event")
        if last is not None and isinstance(last.get("usage"), dict):
            _note_estimated(call, last["usage"])  # checked against the whole answer just above
            return
        # No usage in the last chunk: the upstream's latest (checked again, now against the whole
        # answer), or the estimate when it sent none.
        if prompt is None:
            prompt = self._prompt_bounds(route, call)
        usage = _reconcile_usage(
            last_usage,
            prompt,
            self._stream_completion(route, call, deltas, text_bytes),
            _completion_ceiling(route, call),
        )
        _note_estimated(call, usage)
        tail: JSON = {k: last[k] for k in ("id", "object", "created", "model") if k in last} if last else {}
        if not tail:
            tail = {
                "id": f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{call.request_id}",
                "object": "chat.completion.chunk" if route == "chat" else "text_completion",
                "created": int(time.time()),
                "model": call.upstream_model,
            }
        yield {**tail, "choices": [], "usage": usage}

    def _stream_completion(self, route: Route, call: Call, deltas: int, text_bytes: int) -> tuple[int, int]:
        """(estimate, floor) of a stream's completion tokens, from the text received so far."""
        return max(deltas, math.ceil(text_bytes / 4)), _completion_floor(route, call, text_bytes)

    def _ensure_usage(self, result: JSON, route: Route, call: Call) -> None:
        """Check a non-streaming answer's `usage`, estimating what is missing or untrustworthy."""
        n_bytes = n_choices = generated = 0
        for choice in result.get("choices") or ():
            if isinstance(choice, dict):
                n_choices += 1
                msg = choice.get("message")
                src = msg if isinstance(msg, dict) else {"text": choice.get("text")}
                n_bytes += self._measure({k: v for k, v in src.items() if k != "role"})[0]
                generated += _choice_text_bytes(choice, route, "message")
        completion = (max(n_choices, math.ceil(n_bytes / 4)), _completion_floor(route, call, generated))
        result["usage"] = _reconcile_usage(
            result.get("usage"),
            self._prompt_bounds(route, call),
            completion,
            _completion_ceiling(route, call),
        )
        _note_estimated(call, result["usage"])


def build_openai_backend(
    name: str, entries: Mapping[str, Any] | Sequence[Mapping[str, Any] | OpenAIBackendConfig], **kwargs: Any
) -> OpenAIBackend | FallbackChain:
    """One upstream, or several tried in order: what a routing-table entry of kind `openai` becomes.

    `entries` is one config mapping or a list of them (primary first); a list of more than one
    gives a `FallbackChain` named `name`. Keyword arguments (`sleep`, `rng`, `clock`) go to every
    `OpenAIBackend`. Raises pydantic's `ValidationError` on a bad entry, for the settings loader
    to turn into its one clear line.
    """
    items = [entries] if isinstance(entries, Mapping) else list(entries)
    members = [OpenAIBackend.from_config(dict(e) if isinstance(e, Mapping) else e, **kwargs) for e in items]
    if len(members) == 1:
        return members[0]
    return FallbackChain(name, members)


# ---- helpers ---------------------------------------------------------------------------------------


def _dumps(body: JSON) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # an integer beyond 64 bits (a client's seed, say): the stdlib writes it
        return json.dumps(body).encode()


def _loads_object(raw: bytes | bytearray) -> JSON | None:
    """Parse a JSON object; None for anything else (not JSON, not an object, not UTF-8)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but JSON parsers commonly accept: NaN, integers beyond 64 bits
            value = scrub_surrogates(json.loads(raw))
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _content_bytes(content: Any) -> int:
    """UTF-8 bytes of the text in a message's `content`: a string, or a list of parts."""
    if isinstance(content, str):
        return _utf8_len(content)
    n = 0
    if isinstance(content, list):
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str):
                n += _utf8_len(text)
    return n


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def _choice_text_bytes(choice: JSON, route: Route, field: str = "delta") -> int:
    """Bytes of generated text in one choice (content, reasoning, refusal, tool calls); `field`:
    "delta" for a streamed choice, "message" for a whole one."""
    if route == "completions":
        text = choice.get("text")
        return len(text.encode()) if isinstance(text, str) else 0
    delta = choice.get(field)
    if not isinstance(delta, dict):
        return 0
    n = _content_bytes(delta.get("content"))
    for key in ("reasoning_content", "reasoning", "refusal"):
        v = delta.get(key)
        if isinstance(v, str):
            n += len(v.encode())
    calls = delta.get("tool_calls")
    fns = [tc.get("function") for tc in calls if isinstance(tc, dict)] if isinstance(calls, list) else []
    for fn in [*fns, delta.get("function_call")]:
        if isinstance(fn, dict):
            for key in ("name", "arguments"):
                v = fn.get(key)
                if isinstance(v, str):
                    n += len(v.encode())
    return n


# Usage an upstream reports is checked before the gateway settles limits by it (`_reconcile_usage`).
# A count is a non-negative whole number no larger than `_MAX_REPORTED_TOKENS` (beyond any context
# window; an absurd count would overflow the limiter's arithmetic), and no smaller than the text
# implies at `_MAX_BYTES_PER_TOKEN` — a bound no tokenizer's average reaches (English BPE is ~4
# bytes a token; only long runs of one repeated character come near it).
_MAX_REPORTED_TOKENS = 10**9
_MAX_BYTES_PER_TOKEN = 32


class _Prompt(NamedTuple):
    estimate: Callable[[], int]  # `count_prompt_tokens`, cached: only computed when needed
    floor: int


def _count(value: Any) -> int | None:
    """A token count as an int, or None when `value` is not a plausible one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= _MAX_REPORTED_TOKENS:
        return value
    return None


def _completion_floor(route: Route, call: Call, generated_bytes: int) -> int:
    """The fewest completion tokens the generated text can be (0 with `echo`: the text holds the prompt)."""
    if route == "completions" and call.body.get("echo"):
        return 0
    return math.ceil(generated_bytes / _MAX_BYTES_PER_TOKEN)


def _completion_ceiling(route: Route, call: Call) -> int | None:
    """The most completion tokens the request allowed the upstream: its cap (`max_tokens`, or
    `max_completion_tokens`, which also bounds a reasoning model's hidden tokens) times every
    sequence it asked for (`n`, `best_of`, each completion prompt). None without a cap."""
    body = call.body
    caps = [c for v in (body.get("max_completion_tokens"), body.get("max_tokens")) if (c := _count(v))]
    if not caps:
        return None
    per = 1
    for key in ("n", "best_of"):
        v = _count(body.get(key))
        per = max(per, v or 1)
    prompts = 1
    prompt = body.get("prompt")
    if route == "completions" and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompts = len(prompt)
    return min(caps) * per * prompts


def _reconcile_usage(
    reported: Any, prompt: _Prompt, completion: tuple[int, int] | None, ceiling: int | None = None
) -> JSON:
    """The usage to hand the gateway: the upstream's `reported` usage where each count is
    plausible, the gateway's own estimate where it is missing, not a count, negative, absurd or
    below the floor the text implies (never below the text: max(reported, estimate)); completion
    tokens above `ceiling` (what the request's cap allowed, `_completion_ceiling`) are the ceiling,
    so a buggy upstream cannot bill a key for more than it could have generated.

    `prompt` is the prompt's (lazy) estimate and floor, `completion` the completion's (estimate,
    floor), None for embeddings (which report no completion). The counts returned are
    non-negative ints and `total_tokens` is their sum. When any count was estimated the result is
    a fresh object with `estimated: true` (the upstream's other fields are not trusted either);
    otherwise it is the upstream's object. An upstream that marks its own usage
    `estimated: true` (another Steward) is believed.
    """
    raw: JSON = reported if isinstance(reported, dict) else {}
    estimated = raw.get("estimated") is True
    p = _count(raw.get("prompt_tokens"))
    if p is None or p < prompt.floor:
        p, estimated = max(p or 0, prompt.estimate()), True
    c = 0
    if completion is not None:
        reported_c = _count(raw.get("completion_tokens"))
        if reported_c is None or reported_c < completion[1]:
            c, estimated = max(reported_c or 0, completion[0]), True
        else:
            c = reported_c
        if ceiling is not None and c > ceiling:
            c, estimated = ceiling, True
    if estimated:
        usage: JSON = {"prompt_tokens": p}
        if completion is not None:
            usage["completion_tokens"] = c
        usage["total_tokens"] = p + c
        usage["estimated"] = True
        return usage
    usage = {k: v for k, v in raw.items() if k != "estimated"}
    usage["prompt_tokens"] = p
    if completion is not None:
        usage["completion_tokens"] = c
    else:
        usage.pop("completion_tokens", None)
    usage["total_tokens"] = p + c
    return usage


def _note_estimated(call: Call, usage: JSON) -> None:
    """`call.metadata["usage_estimated"]` says whether the usage handed on was (partly) estimated."""
    if usage.get("estimated") is True:
        call.metadata["usage_estimated"] = True
    else:
        call.metadata.pop("usage_estimated", None)


MAX_RETRY_AFTER_S = 3600.0  # the longest upstream wait handed on (a larger one is capped to it)


def _retry_seconds(value: float) -> float | None:
    """A wait in seconds, clamped to [0, MAX_RETRY_AFTER_S]; None for NaN (not a wait at all).
    `inf` and `1e400` are capped like any other absurd wait, never handed on as infinity."""
    if math.isnan(value):
        return None
    return min(max(0.0, value), MAX_RETRY_AFTER_S)


def _parse_retry_after(headers: Any) -> float | None:
    """`retry-after-ms` (OpenAI's), or `retry-after` as seconds or an HTTP date; at most
    MAX_RETRY_AFTER_S, never infinite or NaN."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            wait = _retry_seconds(float(ms) / 1000.0)
        except ValueError:
            wait = None
        if wait is not None:
            return wait
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return _retry_seconds(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _retry_seconds((when - datetime.now(UTC)).total_seconds())


def _upstream_error_fields(raw: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, code, param) from OpenAI's, vLLM's or Ollama's error bodies."""
    body = _loads_object(raw[:_MAX_ERROR_BODY])
    if body is None:
        return None, None, None, None
    err: Any = body.get("error", body)
    if isinstance(err, str):  # Ollama: {"error": "model not found"}
        return err, None, None, None
    if not isinstance(err, dict):
        return None, None, None, None

    def s(v: Any) -> str | None:
        return v if isinstance(v, str) else None

    return s(err.get("message")), s(err.get("type")), s(err.get("code")), s(err.get("param"))


_DEFAULT_TYPE: dict[int, ErrorType] = {404: "not_found_error"}


def _error_from_status(name: str, status: int, raw: bytes, headers: Any) -> UpstreamError:
    """Map an upstream non-2xx answer to the error the gateway reports (module docstring)."""
    message, etype, code, param = _upstream_error_fields(raw)
    retry_after = _parse_retry_after(headers)
    if status == 429:
        return UpstreamError(
            f"upstream {name!r} is rate limiting" + (f": {message}" if message else ""),
            status=503,
            code="upstream_rate_limited",
            retry_after=retry_after,
            health="alive",
        )
    if status in (401, 403):
        return UpstreamError(
            f"upstream {name!r} refused the gateway's credentials ({status})",
            status=502,
            code="upstream_auth_failed",
            retry_same=False,
            health="alive",
        )
    if status in (408, 504):
        return UpstreamError(f"upstream {name!r} timed out ({status})", status=504, type="timeout_error")
    if status >= 500:
        return UpstreamError(
            f"upstream {name!r} failed ({status})" + (f": {message}" if message else ""),
            status=503 if status == 503 else 502,
            retry_after=retry_after,
            retry_same=status not in (501, 505),
        )
    if 400 <= status < 500:
        client_status = 400 if status == 422 else status
        if etype not in _ERROR_TYPES:
            etype = _DEFAULT_TYPE.get(client_status, "invalid_request_error")
        return UpstreamError(
            message or f"upstream {name!r} rejected the request ({status})",
            status=client_status,
            type=cast(ErrorType, etype),  # checked against ErrorType's values just above
            code=code,
            param=param,
            retryable=False,
            retry_same=False,
            health="alive",
        )
    return _malformed(name, f"an unexpected HTTP status {status}")


def _malformed(name: str, what: str) -> UpstreamError:
    return UpstreamError(
        f"upstream {name!r} sent {what}", status=502, code="upstream_malformed", retry_same=False
    )


def _stream_error(name: str, err: Any) -> UpstreamError:
    message = err.get("message") if isinstance(err, dict) else err
    text = message if isinstance(message, str) else "an error"
    return UpstreamError(f"upstream {name!r} failed mid-stream: {text}", status=502, retry_same=False)


def _transport_error(name: str, e: BaseException) -> UpstreamError:
    """A connection-level failure as a retryable `UpstreamError` (details go to the debug log only)."""
    log.debug("upstream transport error", extra={"backend": name, "error": repr(e)})
    if isinstance(e, TimeoutError):  # aiohttp's connect/read timeouts subclass it
        return UpstreamError(f"upstream {name!r} timed out", status=504, type="timeout_error")
    if isinstance(e, aiohttp.ClientConnectorError):
        return UpstreamError(f"upstream {name!r} is unreachable", status=502, code="upstream_unreachable")
    return UpstreamError(
        f"upstream {name!r} connection failed ({type(e).__name__})",
        status=502,
        code="upstream_connection_error",
    )
