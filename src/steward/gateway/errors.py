"""Every error a client sees is OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

FastAPI's own 422 `{"detail": ...}` and Starlette's HTML/plain errors never reach a client: the
handlers installed by `install_error_handlers` translate them, and an unexpected exception becomes a
500 `server_error` that names the request id but never the exception text (it may hold secrets).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

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


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One readable line from pydantic's error list, and the offending parameter."""
    if not errors:
        return "invalid request", None
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
