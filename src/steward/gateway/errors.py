"""Every error a client sees is OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

FastAPI's own 422 `{"detail": ...}` and Starlette's HTML/plain errors never reach a client: the
handlers installed by `install_error_handlers` translate them, and an unexpected exception becomes a
500 `server_error` that names the request id but never the exception text (it may hold secrets).
`UnhandledErrors`, the outermost middleware, is where every exception nothing else answered ends:
one JSON log line (the exception's type, never its text), the 500 with `x-request-id`, and nothing
for the server to print (Starlette's own handler answers but then re-raises, so uvicorn would print
a traceback with the exception's text and the answer would lack the request id).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("steward.gateway")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    410: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def api_error_response(exc: APIError) -> Response:
    return json_response(exc.status, exc.body(), exc.headers)


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


# A union's branches show in pydantic's `loc` as tags ("str", "list[str]", "constrained-str",
# "TextPart"), never as field names (those are snake_case): `_is_tag` tells them apart.
_SCALAR_TAGS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "none": "null",
}
_PLURALS = {"str": "strings", "int": "integers", "float": "numbers", "bool": "booleans"}
# Fields whose OpenAI form also takes token ids (a list of integers, or of such lists).
_TOKEN_ID_FIELDS = ("input", "prompt")


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and (
        part in _SCALAR_TAGS or "[" in part or "-" in part or part[:1].isupper()
    )


def _expects(tag: str) -> str:
    """What a union branch takes, in words: "a string", "a list of strings"."""
    if tag in _SCALAR_TAGS:
        return _SCALAR_TAGS[tag]
    if tag.startswith("constrained-"):
        return _expects(tag.removeprefix("constrained-"))
    if tag.startswith("list[") and tag.endswith("]"):
        inner = tag[5:-1].removeprefix("constrained-")
        return "a list of " + _PLURALS.get(inner, f"{inner} objects")
    if tag.startswith("dict[") or tag[:1].isupper():
        return "an object"
    return tag


def _kind(tag: str) -> type | None:
    """The JSON type a union branch takes (None: unknown), to pick the branch the value meant."""
    tag = tag.removeprefix("constrained-")
    if tag.startswith("list["):
        return list
    if tag.startswith("dict[") or tag[:1].isupper():
        return dict
    return {"str": str, "int": int, "float": float, "bool": bool, "none": type(None)}.get(tag)


def _describe(value: object) -> str:
    """A JSON value's type, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_ids(value: object) -> str | None:
    """How a token-id input looks, or None when `value` is not one."""
    if not isinstance(value, list) or not value:
        return None
    if all(_is_int(v) for v in value):
        return "a list of integers"
    if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
        return "a list of lists of integers"
    return None


def _union_message(errors: list[Any]) -> tuple[str, str | None] | None:
    """One message for a union field none of whose branches took the value, or None when the
    first error is not about a union. Pydantic reports each branch's failure under a loc ending in
    its tag (`('input', 'str')`, `('input', 'list[str]', 0)`): the first one alone named a parameter
    that does not exist (`input.str`) and the problem of a branch the value never meant."""
    loc = tuple(errors[0].get("loc", ()))
    at = next((i for i, part in enumerate(loc) if i > 0 and _is_tag(part)), None)
    if at is None:
        return None
    field, value_known, value = loc[:at], False, None
    branches: dict[str, list[Any]] = {}
    for err in errors:
        eloc = tuple(err.get("loc", ()))
        if eloc[:at] != field or len(eloc) <= at or not _is_tag(eloc[at]):
            continue
        branches.setdefault(str(eloc[at]), []).append(err)
        if len(eloc) == at + 1:
            value_known, value = True, err.get("input")
    if not value_known:
        return None
    param = _loc_param(field)
    expected = " or ".join(dict.fromkeys(_expects(t) for t in branches))
    meant = next((t for t in branches if _kind(t) is type(value)), None)
    name = str(field[-1])
    if meant is None:
        got = f"got {_describe(value)}"
    else:
        err = branches[meant][0]
        eloc, etype = tuple(err.get("loc", ())), str(err.get("type", ""))
        item = eloc[at + 1 :]
        ids = _token_ids(value) if name in _TOKEN_ID_FIELDS else None
        if ids is not None:
            got = f"got {ids}: token-id input is not supported"
        elif not item and etype == "too_short" and isinstance(value, list | str) and not value:
            got = f"got an empty {'list' if isinstance(value, list) else 'string'}"
        elif not item and etype == "too_long" and isinstance(value, list):
            most = (err.get("ctx") or {}).get("max_length")
            got = f"got {len(value)} items" + (f"; at most {most}" if most is not None else "")
        elif len(item) == 1 and etype.endswith("_type"):
            got = f"got {_describe(err.get('input'))} at {_loc_param((*field, *item))}"
        else:
            # A deeper problem inside the branch the value meant (an empty string where the
            # branch needs text, a content part's missing field): reported as any other error at
            # its path without the branch's tag, under the field's own name as `param`.
            msg, _ = validation_message([{**err, "loc": (*field, *item)}])
            return msg, param
    return f"invalid value for {param}: must be {expected} ({got})", param


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One readable line from pydantic's error list, and the offending parameter."""
    if not errors:
        return "invalid request", None
    union = _union_message(errors)
    if union is not None:
        return union
    err = errors[0]
    param = _loc_param(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        msg = f"missing required parameter: {param}" if param else "missing required parameter"
    elif err.get("type") == "extra_forbidden":
        msg = f"unrecognized request argument supplied: {param}"
    elif param:
        msg = f"invalid value for {param}: {msg}"
    return msg, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> Response:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        msg, param = validation_message(list(exc.errors()))
        return json_response(400, error_body(msg, "invalid_request_error", param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 404:
            msg = "unknown route"
        elif status == 405:
            msg = "method not allowed for this route"
        else:
            msg = str(exc.detail)
        return json_response(status, error_body(msg, _STATUS_TYPES.get(status, "invalid_request_error")))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        rid = getattr(request.state, "request_id", None)
        log.error("unhandled error", exc_info=exc, extra={"request_id": rid})
        return json_response(
            500, error_body(f"internal error; request id {rid}", "server_error", None, "internal_error")
        )


class UnhandledErrors:
    """Outermost ASGI middleware: an exception that reaches it becomes the 500 in OpenAI's shape
    (before the response started), or ends an event stream with that error as its last event (after);
    either way one JSON log line names the request id, and the exception goes no further."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False
        event_stream = False

        async def watch(message: Message) -> None:
            nonlocal started, ended, event_stream
            if message["type"] == "http.response.start":
                started = True
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        event_stream = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            state = scope.get("state") or {}
            rid = str(state.get("request_id") or "req_" + secrets.token_hex(12))
            log.error(
                "unhandled error",
                exc_info=exc,
                extra={"request_id": rid, "route": scope.get("path"), "status": 500},
            )
            body = error_body(f"internal error; request id {rid}", "server_error", None, "internal_error")
            try:
                if not started:
                    raw = orjson.dumps(body)
                    headers = [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(raw)).encode()),
                        (b"x-request-id", rid.encode()),
                    ]
                    await send({"type": "http.response.start", "status": 500, "headers": headers})
                    await send({"type": "http.response.body", "body": raw})
                elif event_stream and not ended:
                    event = b"data: " + orjson.dumps(body) + b"\n\n"
                    await send({"type": "http.response.body", "body": event})
                # Any other response already under way: the server closes the connection, unfinished.
            except Exception:
                log.debug("the client is gone; the 500 was not sent", extra={"request_id": rid})
