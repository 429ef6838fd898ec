"""The request pipeline shared by the OpenAI routes: auth → model → limits → backend → settle.

Route functions stay thin; everything a request goes through, and the trace it leaves, is here.
Guards (input and output) and the audit log attach at the marked points.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from steward.backends.base import JSON, Backend, BackendError, Call, ModelInfo
from steward.gateway.errors import APIError, json_response, validation_message
from steward.gateway.guarding import (
    GENERATED,
    PASS_KEYS,
    TEXT_FIELDS,
    CallSlots,
    generated_texts,
    merge_extra,
    merge_pieces,
)
from steward.gateway.keys import KeyStore, Principal, hash_key
from steward.gateway.limits.base import (
    DEFAULT_LEASE_TTL_S,
    Limit,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    Reservation,
    ratelimit_headers,
)
from steward.gateway.settings import ModelRoute, Settings
from steward.gateway.sse import EventStreamResponse
from steward.gateway.trace import Trace
from steward.store import StoreError
from steward.surrogates import scrub_surrogates

log = logging.getLogger("steward.gateway")

Route = Literal["chat", "completions", "embeddings"]
STREAM_CHUNK_TOKENS = 256  # a stream without max_tokens reserves its tokens in chunks of this size
PROMPT_BYTES_PER_TOKEN = 3.0
"""Text the gateway cannot tokenise is reserved at one token per this many UTF-8 bytes: the bound the
`openai` backend uses for upstream prompts (English BPE averages ~4 bytes per token, code ~3)."""
STREAM_BYTES_PER_TOKEN = 4.0
"""A stream's running token count, checked against its budget before the upstream's usage arrives,
is max(choice events, UTF-8 bytes of the generated text / this): the `openai` backend's own usage
estimate. Counted per event alone, an upstream that sends many tokens in one event (speculative
decoding, a coalescing proxy) would stream far past a budget."""
OFF_LOOP_PROMPT_BYTES = 16_384
"""A request body larger than this has its prompt counted in a worker thread, off the event loop."""
MAX_BYTES_PER_TOKEN = 64
"""No tokenizer averages this many UTF-8 bytes per token over a prompt, so a prompt longer than
this many bytes per token of an in-process model's context cannot fit, and is refused without
tokenising it: the built-in tokenizer holds the GIL while it encodes, so a thread alone does not
keep a megabyte prompt (about a second) from stalling every request on the worker."""
MIN_HOLD_S = 3600.0
"""A request refreshes its concurrency leases while it runs, for at least this long (or twice the
model's timeout): a bound that only matters if a request were never settled."""


def estimate_text_tokens(texts: list[str]) -> int:
    """An upper-bound token estimate for text with no tokenizer at hand (see PROMPT_BYTES_PER_TOKEN)."""
    return sum(math.ceil(len(t.encode("utf-8", "replace")) / PROMPT_BYTES_PER_TOKEN) for t in texts)


class _Hold:
    """Refreshes a reservation's concurrency leases while its request runs, so a slot lasts as long
    as the request (a non-streamed call may wait on its upstream up to the model's `timeout_s`, far
    past the lease TTL), while a crashed worker's slots still come back one TTL after it stopped.

    `stop` lets a refresh in flight finish before returning: the settle that follows must not race
    a refresh that would put a released lease back."""

    def __init__(self, limiter: Limiter, res: Reservation, every_s: float, for_s: float) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(limiter, res, every_s, for_s))

    async def _run(self, limiter: Limiter, res: Reservation, every_s: float, for_s: float) -> None:
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self._stop.wait(), every_s)
                return
            except TimeoutError:
                pass
            if res.settled:
                return
            try:
                kept = await limiter.extend(res, {})
            except Exception:
                log.warning("refreshing a concurrency lease failed", exc_info=True)
                continue
            if not kept and not res.settled:
                # The lease expired (the store or this loop stalled past its TTL) and its slot went
                # to another request: this one runs on, over its concurrency limit until it ends.
                log.warning("a concurrency lease was lost while its request ran; the limit may be exceeded")
                return

    async def stop(self) -> None:
        self._stop.set()
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            self._task.cancel()
            raise
        except Exception:
            log.warning("the concurrency lease refresher failed", exc_info=True)


class AuditUnavailable(APIError):
    """The audit log could not commit the request's event: no answer goes out without its record."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "the audit log is unavailable; the request was not served",
            type="service_unavailable",
            code="audit_unavailable",
        )


@dataclass
class ModelEntry:
    route: ModelRoute
    backend: Backend
    info: ModelInfo


class Gateway:
    """Everything a request needs: settings, keys, limiter, the routing table, metrics."""

    def __init__(
        self,
        settings: Settings,
        keys: KeyStore,
        limiter: Limiter,
        models: dict[str, ModelEntry],
        metrics: Any = None,
        on_finish: Callable[[Trace], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.limiter = limiter
        self.models = models
        self.metrics = metrics
        self.on_finish = on_finish
        self.ready = False
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}
        self.audit: Any = None  # steward.gateway.audit_sink.AuditSink when the audit log is on
        self.guard: Any = None  # steward.gateway.guarding.Guard when guards are on
        self._holds: dict[str, _Hold] = {}  # reservation id -> its lease refresher, until settled

    # -- identity -------------------------------------------------------------------------------------
    async def principal(self, request: Request, trace: Trace | None = None) -> Principal:
        header = request.headers.get("authorization")
        if not header:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer sk-stw-...'",
                code="missing_api_key",
            )
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "the Authorization header must be 'Bearer <key>'", code="invalid_api_key")
        try:
            cached = self.keys.authenticate_cached(key)
            p = await self._lookup(key) if cached is False else cached
        except StoreError:
            raise APIError(
                503, "the key store is unavailable; try again", type="service_unavailable", code="store_error"
            ) from None
        if trace is not None and key.startswith("sk-stw-"):
            trace.key_prefix = key[:11]
        if p is None:
            # Never echo the key; the prefix alone is what refusal events may name.
            raise APIError(401, "invalid, expired or revoked API key", code="invalid_api_key")
        if trace is not None:
            trace.key_id, trace.key_prefix, trace.tenant, trace.role = (
                p.key_id,
                p.key_prefix,
                p.tenant,
                p.role,
            )
        return p

    async def _lookup(self, key: str) -> Principal | None:
        """One store lookup per key at a time: when a hot key's cache entry expires, the requests
        that miss together share a single query instead of each running their own."""
        h = hash_key(key)
        fut = self._inflight.get(h)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.keys.authenticate, key))
            self._inflight[h] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(h, None))
        return await asyncio.shield(fut)

    # -- models ---------------------------------------------------------------------------------------
    def model(self, name: str, principal: Principal, route: Route) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise APIError(
                404,
                f"the model {name!r} does not exist",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        if not principal.may_use(name):
            raise APIError(
                403, f"this key may not use the model {name!r}", param="model", code="model_not_allowed"
            )
        caps = entry.info.capabilities
        need = "embeddings" if route == "embeddings" else "chat"
        if need not in caps and not (need == "chat" and "completions" in caps):
            what = "embeddings" if route == "embeddings" else "text generation"
            raise APIError(
                400, f"the model {name!r} does not support {what}", param="model", code="model_not_supported"
            )
        return entry

    # -- limits ---------------------------------------------------------------------------------------
    @staticmethod
    def limits_for(p: Principal) -> list[Limit]:
        out = []
        for scope, specs in ((f"key:{p.key_id}", p.key_limits), (f"tenant:{p.tenant}", p.tenant_limits)):
            for s in specs:
                out.append(Limit(scope, s["kind"], s.get("window"), float(s["limit"])))
        return out

    async def reserve(
        self, limits: list[Limit], amounts: Mapping[str, float], hold_s: float = MIN_HOLD_S
    ) -> Reservation | None:
        """Reserve `amounts`, or raise the 429 (or 503) the client gets. A reservation that holds a
        concurrency slot keeps it, refreshed, until `settle` (for up to `hold_s`)."""
        if not limits:
            return None
        try:
            res = await self.limiter.reserve(limits, amounts)  # type: ignore[arg-type]
        except LimitExceeded as exc:
            headers = ratelimit_headers(exc.statuses)
            headers["retry-after"] = str(exc.retry_after)
            kind = exc.limit.kind
            code = "insufficient_quota" if kind == "spend" else "rate_limit_exceeded"
            raise APIError(429, str(exc), type="rate_limit_error", code=code, headers=headers) from None
        except LimiterUnavailable:
            raise APIError(
                503,
                "the rate limiter is unavailable; requests are refused until it is back",
                type="service_unavailable",
                code="limiter_unavailable",
            ) from None
        if res.leases:
            ttl = float(getattr(self.limiter, "lease_ttl_s", DEFAULT_LEASE_TTL_S))
            self._holds[res.id] = _Hold(self.limiter, res, max(ttl / 3, 0.01), max(hold_s, MIN_HOLD_S))
        return res

    async def settle(self, res: Reservation | None, actual: Mapping[str, float]) -> None:
        if res is None:
            return
        hold = self._holds.pop(res.id, None)
        cancelled: asyncio.CancelledError | None = None
        if hold is not None:
            try:
                await hold.stop()
            except asyncio.CancelledError as exc:  # settle anyway, then let the cancellation go on
                cancelled = exc
        try:
            await self.limiter.settle(res, actual)  # type: ignore[arg-type]
        except Exception:  # settling must never turn a served answer into an error
            # The store limiters keep a failed settle and retry it (limits/retry.py): the lease and
            # the reserved amounts are not left charged until they expire.
            log.exception("limit settlement failed; it is retried", extra={"reservation": res.id})
        if cancelled is not None:
            raise cancelled

    # -- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def parse(model: type[BaseModel], raw: bytes) -> Any:
        if not raw:
            raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            errors = exc.errors()
            if errors and errors[0].get("type") == "json_invalid":
                raise APIError(
                    400,
                    f"the request body is not valid JSON ({errors[0].get('msg', 'invalid JSON')})",
                    code="invalid_json",
                ) from None
            if errors and errors[0].get("type") == "model_type":
                raise APIError(400, "the request body must be a JSON object", code="invalid_json") from None
            msg, param = validation_message(list(errors))
            raise APIError(400, msg, param=param, code="invalid_value") from None

    def spend(self, entry: ModelEntry, prompt: float, completion: float) -> float:
        r = entry.route
        return prompt / 1000 * r.price_per_1k_prompt + completion / 1000 * r.price_per_1k_completion

    async def finish(
        self, trace: Trace, status: int, outcome: str, error: dict[str, Any] | None = None
    ) -> None:
        trace.finish(status, outcome, error)
        log.info(
            "request",
            extra={
                "request_id": trace.request_id,
                "status": status,
                "route": trace.route,
                "model": trace.model,
                "tenant": trace.tenant,
                "key_prefix": trace.key_prefix,
                "latency_ms": trace.latency_ms.get("total"),
                "outcome": outcome,
            },
        )
        if self.metrics is not None:
            self.metrics.observe(trace)
        if self.on_finish is not None:
            try:
                r = self.on_finish(trace)
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("audit commit failed", extra={"request_id": trace.request_id})
                raise AuditUnavailable() from None

    async def traced(
        self,
        trace: Trace,
        work: Callable[[], Awaitable[tuple[int, Any] | tuple[int, Any, dict[str, str]]]],
    ) -> Response:
        """Run a non-inference route's `work` under `trace`: every outcome is finished (audited)
        before the answer leaves; a store failure is a 503; an unexpected exception a 500 that names
        the request id, never the exception's text; if the record cannot be committed the caller
        gets 503, never an answer without its record (the act itself may have happened). `work`
        returns (status, body) or (status, body, headers)."""
        try:
            done = await work()
        except ClientDisconnect:
            return await self._gone(trace)
        except StoreError:
            err = APIError(503, "the store is unavailable", type="service_unavailable", code="store_error")
            return await self._refuse(trace, err)
        except APIError as exc:
            return await self._refuse(trace, exc)
        except Exception as exc:
            return await self._refuse(trace, self._unexpected(trace, exc))
        status, body = done[0], done[1]
        headers = done[2] if len(done) > 2 else None
        try:
            await self.finish(trace, status, "ok")
        except AuditUnavailable as exc:
            return json_response(exc.status, exc.body())
        return json_response(status, body, headers)

    @staticmethod
    def _unexpected(trace: Trace, exc: BaseException) -> APIError:
        """The 500 for an exception nobody expected: logged (its type only: its text may hold the
        request's content), answered in OpenAI's shape with the request id."""
        log.error(
            "unhandled error",
            exc_info=exc,
            extra={"request_id": trace.request_id, "route": trace.route, "status": 500},
        )
        return APIError(
            500,
            f"internal error; request id {trace.request_id}",
            type="server_error",
            code="internal_error",
        )

    async def _gone(self, trace: Trace) -> Response:
        """The client left while its request was still arriving: recorded as cancelled (499, as
        nginx names it), not as the gateway's error; nobody reads the response."""
        try:
            await self.finish(trace, 499, "cancelled")
        except AuditUnavailable as exc:
            return json_response(exc.status, exc.body())
        return Response(status_code=499)

    async def _refuse(self, trace: Trace, exc: APIError) -> Response:
        outcome = "refused" if exc.status in (401, 403, 429) else "error"
        try:
            await self.finish(trace, exc.status, outcome, exc.body()["error"])
        except AuditUnavailable as audit_exc:
            return json_response(audit_exc.status, audit_exc.body())
        return json_response(exc.status, exc.body(), exc.headers)

    # -- the inference pipeline -----------------------------------------------------------------------
    async def handle(self, request: Request, route: Route, schema: type[BaseModel]) -> Response:
        state = request.scope.get("state", {})
        trace = Trace(request_id=state.get("request_id", ""), route=request.url.path)
        trace.t0 = state.get("t0", trace.t0)
        try:
            try:
                resp = await self._handle(request, route, schema, trace, state)
            except (AuditUnavailable, APIError):
                raise
            except ClientDisconnect:
                return await self._gone(trace)
            except Exception as unexpected:
                raise self._unexpected(trace, unexpected) from None
        except AuditUnavailable as exc:
            return json_response(exc.status, exc.body())
        except APIError as exc:
            state["backend_s"] = trace.backend_s
            outcome = "refused" if exc.status in (401, 403, 429) else "error"
            if exc.code == "content_policy_violation":
                outcome = "blocked"
            trace.payload = None
            try:
                await self.finish(trace, exc.status, outcome, exc.body()["error"])
            except AuditUnavailable as audit_exc:
                return json_response(audit_exc.status, audit_exc.body())
            return json_response(exc.status, exc.body(), exc.headers)
        return resp

    async def _handle(
        self, request: Request, route: Route, schema: type[BaseModel], trace: Trace, state: dict[str, Any]
    ) -> Response:
        """One inference request. The limits reserve an upper bound of what it can use, settled to
        the real usage after: prompt tokens (the backend's estimate, an upper bound, covering every
        prompt of a list) plus the completion budget × choices per prompt × prompts. The completion
        budget is the request's own cap, else what the backend will generate, else the gateway's
        `default_max_tokens`; in that last case, when the key or tenant has a token or spend budget,
        a non-streamed request goes upstream with that cap (`max_tokens`, or the model's
        `chat_cap_field` for chat), so the reservation is a bound the answer cannot pass. A stream
        without a cap reserves in chunks of STREAM_CHUNK_TOKENS and is cut when the next chunk would
        cross a limit."""
        t = time.perf_counter()
        principal = await self.principal(request, trace)
        if principal.role == "auditor":
            raise APIError(403, "auditor keys may not call inference routes", code="role_not_allowed")
        raw = await request.body()
        req = self.parse(schema, raw)
        entry = self.model(req.model, principal, route)
        trace.model, trace.backend = entry.info.id, entry.info.backend
        trace.weights_sha256 = entry.info.weights_sha256
        # The guard names the policy it ran (`name@hash`); with guards off, none ran.
        trace.policy_version = (principal.tenant_policy or "default") if self.guard is not None else None
        trace.user = getattr(req, "user", None)
        stream = route != "embeddings" and bool(getattr(req, "stream", False))
        trace.stream = stream
        body = req.model_dump(exclude_none=True)
        resolve = getattr(entry.backend, "upstream_model", None)
        body["model"] = str(resolve(entry.route.name)) if callable(resolve) else entry.route.name
        opts = body.get("stream_options")
        client_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        if stream:
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        t = trace.mark("auth", t)
        inp = None
        if self.guard is not None:
            inp = await self.guard.scan_input(route, body, principal, trace)
            t = trace.mark("guard_input", t)
        call = Call(body=body, upstream_model=body["model"], request_id=trace.request_id)
        call.timeout_s = entry.route.timeout_s
        # Shared, not copied: what the backend learns later (the fallback member that served,
        # attempts, estimated usage) is there when the audit event is built.
        trace.extra["upstream"] = call.metadata

        backend = entry.backend
        big = len(raw) > OFF_LOOP_PROMPT_BYTES
        ctx = entry.info.context_length
        if big and ctx and route != "embeddings" and hasattr(backend, "max_new_tokens"):
            size = _prompt_bytes(body)
            if size > ctx * MAX_BYTES_PER_TOKEN:
                raise APIError(
                    400,
                    f"this model's maximum context length is {ctx} tokens; the prompt's {size} bytes "
                    "cannot fit in it",
                    type="invalid_request_error",
                    param="messages" if route == "chat" else "prompt",
                    code="context_length_exceeded",
                )
        prompt_est = await self._backend_call(
            lambda: backend.count_prompt_tokens("chat" if route == "chat" else "completions", call), big
        )
        # Choices generated per prompt (a completion's `best_of` generates that many and returns
        # `n`), and prompts (a completion's prompt may be a list; each gets its own choices).
        choices = 1 if route == "embeddings" else int(body.get("n") or 1)
        prompts = 1
        if route == "completions":
            choices = max(choices, int(body.get("best_of") or 1))
            prompts = len(req.prompts())
        budget = getattr(req, "token_budget", lambda: None)()
        cap = False
        if route == "embeddings":
            max_new = 0
        elif budget is not None:
            max_new = budget
        elif hasattr(backend, "max_new_tokens"):
            max_new = await self._backend_call(lambda: backend.max_new_tokens(route, call), big)
        elif stream:
            max_new = STREAM_CHUNK_TOKENS
        else:
            max_new, cap = self.settings.default_max_tokens, True
        limits = self.limits_for(principal)
        if cap and any(lim.kind in ("tokens", "spend") for lim in limits):
            field = entry.route.chat_cap_field if route == "chat" else "max_tokens"
            body[field] = max_new
        completion_max = max_new * choices * prompts
        tokens = prompt_est + completion_max
        amounts = {
            "requests": 1.0,
            "tokens": float(tokens),
            "spend": self.spend(entry, prompt_est, completion_max),
            "concurrent": 1.0,
        }
        res = await self.reserve(limits, amounts, hold_s=2 * entry.route.timeout_s)
        t = trace.mark("limits", t)
        trace.limits = {"reserved_tokens": tokens} if res is not None else {}
        headers = {}
        if res is not None:
            headers = ratelimit_headers(res.statuses)
        try:
            if stream:
                return await self._stream(
                    route,
                    entry,
                    call,
                    trace,
                    res,
                    state,
                    headers,
                    client_usage,
                    unbounded=budget is None and not hasattr(backend, "max_new_tokens"),
                    inp=inp,
                    prompt_tokens=int(prompt_est),
                    reserved_completion=int(completion_max),
                    n_choices=int(body.get("n") or 1) * prompts,
                )
            b0 = time.perf_counter()
            try:
                if route == "chat":
                    out = await backend.chat(call)
                elif route == "completions":
                    out = await backend.completion(call)
                else:
                    out = await backend.embeddings(call)
            finally:
                trace.backend_s += time.perf_counter() - b0
                state["backend_s"] = trace.backend_s
        except BackendError as exc:
            await self.settle(res, {"tokens": 0, "spend": 0})
            raise _api_error(exc) from None
        except BaseException:
            await self.settle(res, {"tokens": 0, "spend": 0})
            raise
        usage = out.get("usage") or {}
        pt, ct = float(usage.get("prompt_tokens", 0)), float(usage.get("completion_tokens", 0))
        actual = {"tokens": pt + ct, "spend": self.spend(entry, pt, ct)}
        try:
            out["model"] = entry.route.name
            trace.usage = dict(usage)
            blocked = False
            if inp is not None:
                g0 = time.perf_counter()
                blocked = await self.guard.scan_output(route, out, inp, trace)
                trace.mark("guard_output", g0)
            trace.payload = {"request": call.body, "response": out.get("choices")}
        finally:
            await self.settle(res, actual)  # the real usage, whatever happens after the answer
        # An answer the output guard cut whole is "blocked", as the same answer streamed is.
        await self.finish(trace, 200, "blocked" if blocked else "ok")
        return json_response(200, out, headers)

    async def _backend_call(self, fn: Callable[[], Any], off_loop: bool = False) -> Any:
        """A backend's synchronous helper (counting prompt tokens, the completion budget), in a
        worker thread when `off_loop` (a large prompt: tokenising it would block the loop)."""
        try:
            return await asyncio.to_thread(fn) if off_loop else fn()
        except BackendError as exc:
            raise _api_error(exc) from None

    async def _stream(
        self,
        route: Route,
        entry: ModelEntry,
        call: Call,
        trace: Trace,
        res: Reservation | None,
        state: dict[str, Any],
        headers: dict[str, str],
        client_usage: bool,
        unbounded: bool,
        inp: Any = None,
        prompt_tokens: int = 0,
        reserved_completion: int = STREAM_CHUNK_TOKENS,
        n_choices: int = 1,
    ) -> Response:
        backend = entry.backend
        b0 = time.perf_counter()
        try:
            it = backend.chat_stream(call) if route == "chat" else backend.completion_stream(call)
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
            it = _empty()
        except BackendError as exc:
            await self.settle(res, {"tokens": 0, "spend": 0})
            raise _api_error(exc) from None
        finally:
            trace.backend_s += time.perf_counter() - b0
            state["backend_s"] = trace.backend_s

        async def events() -> AsyncIterator[bytes]:
            usage: dict[str, Any] = {}
            counted = 0  # completion tokens seen so far (estimated from the text; see STREAM_BYTES_PER_TOKEN)
            pieces = text_bytes = 0  # what `counted` is estimated from
            reserved = max(reserved_completion, 1)  # completion tokens reserved so far
            status, outcome, error = 200, "ok", None
            scan = None if inp is None or self.guard is None else self.guard.stream(inp, route, n_choices)
            sent = _Delivered()
            base = {k: v for k, v in (first or {}).items() if k not in ("choices", "usage")}
            usage_event: dict[str, Any] | None = None  # the upstream's own usage chunk, sent last
            finished = False

            async def close_out() -> None:
                # Settle and finish (the audit commit) BEFORE the final event reaches the client.
                nonlocal finished, usage
                if finished:
                    return
                finished = True
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        log.debug("closing a backend stream failed", exc_info=True)
                if not usage:
                    # Cut before the backend's usage arrived: count what was produced; the prompt
                    # count is the reservation's (exact for in-process models).
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": counted,
                        "total_tokens": prompt_tokens + counted,
                    }
                    trace.usage = {**usage, "estimated": True}
                else:
                    trace.usage = dict(usage)
                pt = float(usage.get("prompt_tokens", 0))
                ct = float(usage.get("completion_tokens", counted))
                if scan is not None:
                    trace.guard.extend(scan.reports())
                trace.payload = sent.payload(call.body)
                await self.settle(res, {"tokens": pt + ct, "spend": self.spend(entry, pt, ct)})
                try:
                    await self.finish(trace, status, outcome, error)
                except AuditUnavailable as exc:
                    audit_error.append(exc.body())

            audit_error: list[dict[str, Any]] = []

            def event(ev: dict[str, Any]) -> bytes:
                data, ev = _dumps_event(ev)
                sent.record(ev)
                return b"data: " + data + b"\n\n"

            def usage_chunk() -> bytes:
                # The usage a client asked for arrives even when the stream was cut short.
                ev = usage_event or {**base, "model": entry.route.name, "choices": [], "usage": usage}
                return b"data: " + orjson.dumps(ev) + b"\n\n"

            def done() -> bytes:
                # The final event: [DONE] only once the request's audit record is committed.
                if audit_error:
                    return b"data: " + orjson.dumps(audit_error[0]) + b"\n\n"
                return b"data: [DONE]\n\n"

            try:
                chunk, end = first, "eof"
                while chunk is not None:
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk.get("choices"):
                        _check_indexes(chunk, n_choices, entry.route.name)
                        chunk["model"] = entry.route.name
                        base = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
                        before = counted
                        pieces += len(chunk["choices"])
                        text_bytes += sum(_generated_bytes(c) for c in chunk["choices"])
                        counted = max(pieces, math.ceil(text_bytes / STREAM_BYTES_PER_TOKEN))
                        over = False
                        if unbounded and res is not None and counted >= reserved:
                            # Whole chunks of STREAM_CHUNK_TOKENS, as many as this event needs.
                            more = STREAM_CHUNK_TOKENS * ((counted - reserved) // STREAM_CHUNK_TOKENS + 1)
                            over = not await self.limiter.extend(res, {"tokens": more})
                            reserved += 0 if over else more
                        if over and counted > reserved:
                            # The event crosses the budget: only what the budget still allows goes
                            # on (by the same bytes-per-token estimate), the rest is dropped here,
                            # before a guard could hold it and release it at the cut.
                            allowed = int(max(0, reserved - before) * STREAM_BYTES_PER_TOKEN)
                            text_bytes -= sum(_generated_bytes(c) for c in chunk["choices"])
                            _trim_choices(chunk["choices"], allowed)
                            text_bytes += sum(_generated_bytes(c) for c in chunk["choices"])
                            counted = max(pieces, math.ceil(text_bytes / STREAM_BYTES_PER_TOKEN))
                        out = [chunk] if scan is None else await scan.chunk(chunk)
                        for oc in out:
                            yield event(oc)
                        if over:  # a hard cap: stop here rather than let the stream run past it
                            end = "cut"
                            break
                        if scan is not None and scan.all_cut:
                            end = "blocked"
                            break
                    elif chunk.get("usage"):
                        chunk["model"] = entry.route.name
                        usage_event = chunk
                    chunk = await anext(it, None)
                # The end: every choice still open is finished (a cut) or has its held text
                # released (an upstream that ended without a finish_reason).
                if end == "cut":
                    outcome = "cut"
                    tail = await scan.close(base, "length") if scan is not None else []
                    for oc in tail:
                        yield event(oc)
                    for i in sorted(sent.seen.union(range(n_choices)) - sent.finished):
                        stop: dict[str, Any] = {"index": i, "finish_reason": "length"}
                        if route == "chat":
                            stop["delta"] = {}
                        else:
                            stop.update(text="", logprobs=None)
                        yield event({**base, "choices": [stop]})
                elif end == "eof" and scan is not None:
                    for oc in await scan.close(base, None):
                        yield event(oc)
                if scan is not None and (scan.all_cut or scan.all_seen_cut) and outcome == "ok":
                    outcome = "blocked"
                await close_out()
                if client_usage and not audit_error:
                    yield usage_chunk()
                yield done()
            except BackendError as exc:
                status, outcome = exc.status, "error"
                error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
                await close_out()
                yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
            except LimiterUnavailable:
                # As the same failure before the stream: a 503, not an internal error.
                status, outcome = 503, "error"
                error = {
                    "message": "the rate limiter is unavailable; requests are refused until it is back",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "limiter_unavailable",
                }
                await close_out()
                yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
            except Exception as exc:
                # Headers are gone: the stream ends with the 500 as its last event (never the text).
                status, outcome = 500, "error"
                error = self._unexpected(trace, exc).body()["error"]
                await close_out()
                yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                if not finished:
                    if outcome == "ok":
                        outcome = "cancelled"  # the client went away mid-stream
                    await close_out()

        hdrs = {**headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
        return EventStreamResponse(events(), headers=hdrs)


MAX_RETRY_AFTER_S = 3600  # the longest Retry-After the gateway hands on


def _api_error(exc: BackendError) -> APIError:
    """A backend's error as the client gets it, streamed or not. The upstream's wait goes on in
    Retry-After as whole seconds rounded up: a 0.4 s wait read as "0" would have clients retry at
    once. A wait that is not finite (or absurd) from any backend is capped at MAX_RETRY_AFTER_S."""
    wait = exc.retry_after
    headers = None
    if wait and not math.isnan(wait):
        headers = {"retry-after": str(math.ceil(min(wait, MAX_RETRY_AFTER_S)))}
    return APIError(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=headers)


def _dumps_event(ev: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """A stream event's bytes, and the event as sent (what the audit payload records). An event
    orjson refuses (a lone surrogate no path should still carry, an integer past 64 bits from the
    upstream) goes out with its surrogates replaced, written by the standard library: never the
    500 that would end the stream, and the request keeps its audit record."""
    try:
        return orjson.dumps(ev), ev
    except TypeError:
        ev = scrub_surrogates(ev)
        return json.dumps(ev, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), ev


def _check_indexes(chunk: dict[str, Any], n_choices: int, model: str) -> None:
    """Every choice of a stream chunk gets an int `index`. A choice whose index is missing or not an
    int (`null`, a string) is choice 0 of a single-choice stream; in a stream of several choices
    there is no telling which it belongs to, so the stream ends with a 502 (a malformed upstream
    answer) rather than a 500. A choice that is not an object, or a `choices` that is not a list,
    is malformed too."""
    choices = chunk["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise BackendError(f"upstream {model!r} sent a stream chunk whose choices are malformed", status=502)
    for c in choices:
        index = c.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            continue
        if n_choices == 1 and len(choices) == 1:
            c["index"] = 0
        else:
            raise BackendError(
                f"upstream {model!r} sent a stream chunk whose choice has no valid index", status=502
            )


_TRIMMED_KEYS = ("text", "refusal", "name", "arguments", "input", "transcript", "summary")
"""The strings a content part or a tool call carries from the model; `type`, `id` and the like
keep their values when a crossing event is trimmed."""


def _trim_text(text: str, budget: list[int]) -> str:
    """`text` cut to at most `budget[0]` UTF-8 bytes (never inside a character); the budget is spent."""
    raw = text.encode("utf-8", "replace")
    kept = raw[: budget[0]].decode("utf-8", "ignore") if len(raw) > budget[0] else text
    budget[0] -= len(kept.encode("utf-8", "replace"))
    return kept


def _trim_value(value: Any, budget: list[int]) -> Any:
    """A generated field's value with its text cut to the budget, walked in order: a string, content
    parts, tool calls (their name, arguments or input; a name that does not fit whole is dropped,
    never cut into another name)."""
    if isinstance(value, str):
        return _trim_text(value, budget)
    if isinstance(value, list):
        return [_trim_value(v, budget) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        if k == "name" and isinstance(v, str) and len(v.encode("utf-8", "replace")) > budget[0]:
            out[k] = ""
        elif isinstance(v, dict | list) or (isinstance(v, str) and k in _TRIMMED_KEYS):
            out[k] = _trim_value(v, budget)
        else:
            out[k] = v
    return out


def _trim_choices(choices: list[Any], allowed: int) -> None:
    """Cut the generated text of a stream chunk's choices, in order, to `allowed` UTF-8 bytes in
    all, in place. A choice cut (or emptied) loses its finish_reason: the budget cut finishes it
    with "length". A choice whose text cannot be measured after the cut is emptied whole."""
    budget = [allowed]
    for c in choices:
        if not isinstance(c, dict):
            continue
        size = _generated_bytes(c)
        if size <= budget[0]:
            budget[0] -= size
            continue
        start = budget[0]
        if "delta" in c and isinstance(c["delta"], dict):
            c["delta"] = {
                k: _trim_value(v, budget) if k not in PASS_KEYS else v for k, v in c["delta"].items()
            }
        elif isinstance(c.get("text"), str):
            c["text"] = _trim_text(c["text"], budget)
        if _generated_bytes(c) > start:  # a shape the walk does not know: drop its text entirely
            if isinstance(c.get("delta"), dict):
                c["delta"] = {k: v for k, v in c["delta"].items() if k in PASS_KEYS}
            if "text" in c:
                c["text"] = ""
            budget[0] = start
        c["finish_reason"] = None
        if c.get("logprobs"):
            c["logprobs"] = None  # they carry the dropped tokens' text too


def _prompt_bytes(body: dict[str, Any]) -> int:
    """UTF-8 bytes of the text a generation request gives the model: its messages' contents (text
    parts too), or its prompts and suffix."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    size = 0
    for value in (body.get("prompt"), body.get("suffix"), *(m.get("content") for m in messages)):
        for item in value if isinstance(value, list) else [value]:
            text = item.get("text") if isinstance(item, dict) else item
            size += len(text.encode("utf-8", "replace")) if isinstance(text, str) else 0
    return size


def _generated_bytes(choice: dict[str, Any]) -> int:
    """UTF-8 bytes of all the text one choice of a stream chunk carries from the model (content,
    reasoning, tool-call arguments): what the stream's token count is estimated from."""
    return sum(len(t.encode("utf-8", "replace")) for t in generated_texts(choice))


class _Delivered:
    """What a stream's client has been sent, per choice. The audit payload is built from it, so it
    holds the text the client got (after redaction), never text held back, cut or dropped; and a
    budget cut reads from it which choices still need a finish_reason."""

    def __init__(self) -> None:
        self.text: dict[int, list[str]] = {}
        self.fields: dict[int, dict[str, Any]] = {}  # other generated fields: reasoning, tool calls
        self.slots: dict[int, CallSlots] = {}  # per choice: which call each tool-call delta adds to
        self.seen: set[int] = set()
        self.finished: set[int] = set()

    def record(self, chunk: dict[str, Any]) -> None:
        for c in chunk.get("choices") or []:
            i = int(c.get("index", 0))
            self.seen.add(i)
            if c.get("finish_reason") is not None:
                self.finished.add(i)
            delta = c.get("delta") if "delta" in c else {"content": c.get("text")}
            for k, v in (delta if isinstance(delta, dict) else {}).items():
                if k == "content" and isinstance(v, str) and v:
                    self.text.setdefault(i, []).append(v)
                elif k not in PASS_KEYS and k != "content":
                    self._field(i, k, v)

    def _field(self, i: int, k: str, v: Any) -> None:
        # Pieces are kept as they came and joined once in `payload`: a long stream's reasoning or
        # tool-call arguments arrive in tens of thousands of pieces (string += was quadratic).
        f = self.fields.setdefault(i, {})
        if k in TEXT_FIELDS and isinstance(v, str):
            f.setdefault(k, []).append(v)
        elif k == "tool_calls" and isinstance(v, list):
            calls = f.setdefault(k, {})
            slots = self.slots.setdefault(i, CallSlots())
            for tc in v:
                if isinstance(tc, dict):
                    calls.setdefault(slots.slot(tc), []).append(tc)
        elif (k == "function_call" and isinstance(v, dict)) or k not in GENERATED:
            # the legacy call, or a field the guard has no name for (`audio`, `reasoning_details`)
            f.setdefault(k, []).append(v)

    def payload(self, request: dict[str, Any]) -> dict[str, Any]:
        out = {"request": request, "response": {str(i): "".join(p) for i, p in sorted(self.text.items())}}
        fields = {
            str(i): {k: self._joined(k, v) for k, v in f.items()} for i, f in sorted(self.fields.items()) if f
        }
        if fields:
            out["response_fields"] = fields
        return out

    @staticmethod
    def _joined(k: str, v: Any) -> Any:
        if k == "tool_calls":
            return [merge_pieces(v[j]) for j in sorted(v)]
        if k == "function_call":
            return merge_pieces(v)
        if k in TEXT_FIELDS:
            return "".join(v)
        return merge_extra(v)


async def _empty() -> AsyncIterator[JSON]:
    return
    yield  # pragma: no cover
