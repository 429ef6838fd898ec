"""OpenAI-compatible inference routes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from steward.gateway.errors import json_response
from steward.gateway.keys import Principal
from steward.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from steward.gateway.service import Gateway

router = APIRouter()


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _body(model: type) -> dict[str, object]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


@router.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await _gw(request).handle(request, "chat", ChatCompletionRequest)


@router.post("/v1/completions", openapi_extra=_body(CompletionRequest))
async def completions(request: Request) -> Response:
    return await _gw(request).handle(request, "completions", CompletionRequest)


@router.post("/v1/embeddings", openapi_extra=_body(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    return await _gw(request).handle(request, "embeddings", EmbeddingRequest)


def _may_call(p: Principal, model: str) -> bool:
    """Whether the key may send `model` a request: an auditor reads the audit log and may call no
    inference route (403 `role_not_allowed`), so it is shown no model, as a key whose allow-list
    excludes it is not."""
    return p.role != "auditor" and p.may_use(model)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    gw = _gw(request)
    p = await gw.principal(request)
    now = int(time.time())
    data = [
        {"id": name, "object": "model", "created": now, "owned_by": e.info.owned_by}
        for name, e in gw.models.items()
        if _may_call(p, name)
    ]
    return json_response(200, {"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    gw = _gw(request)
    p = await gw.principal(request)
    e = gw.models.get(model_id)
    if e is None or not _may_call(p, model_id):
        from steward.gateway.errors import APIError

        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
    return json_response(
        200, {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": e.info.owned_by}
    )
