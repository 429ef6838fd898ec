"""The FastAPI application: `create_app(settings)` wires store, keys, limiter, backends and routes.

Models load in the lifespan, before uvicorn starts accepting connections, so a listening gateway
is a ready one; `/readyz` says so for load balancers.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from steward.backends.base import Backend, ModelInfo
from steward.gateway.errors import UnhandledErrors, install_error_handlers
from steward.gateway.keys import KeyStore
from steward.gateway.metrics import Metrics
from steward.gateway.middleware import GatewayMiddleware
from steward.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    KeyCreate,
    TenantUpdate,
)
from steward.gateway.service import Gateway, ModelEntry
from steward.gateway.settings import ModelRoute, Settings

log = logging.getLogger("steward.gateway")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; only whitelisted fields, so no prompt or key can slip into a log."""

    FIELDS = ("request_id", "status", "route", "model", "tenant", "key_prefix", "latency_ms", "outcome")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for f in self.FIELDS:
            v = record.__dict__.get(f)
            if v is not None:
                out[f] = v
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = record.exc_info[0].__name__
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("steward")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def build_backend(route: ModelRoute, settings: Settings, serve_as: str | None = None) -> Backend:
    """The backend for one routing-table entry. `serve_as` builds an upstream member of another
    model's fallback chain: it maps that model's name to this route's upstream model."""
    if route.backend == "builtin":
        from steward.backends.builtin import BuiltinBackend

        return BuiltinBackend(
            route.name,
            route.path,
            max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms,
            default_max_tokens=settings.default_max_tokens,
            threads=settings.torch_threads,
        )
    if route.backend == "hf":
        from steward.backends.hf import HFBackend

        assert route.path is not None
        return HFBackend(route.name, route.path, default_max_tokens=settings.default_max_tokens)
    import os

    from pydantic import SecretStr

    from steward.backends.openai import OpenAIBackend, OpenAIBackendConfig

    assert route.base_url is not None
    key = os.environ.get(route.api_key_env) if route.api_key_env else None
    if route.api_key_env and not key:
        raise ValueError(f"model {route.name!r}: environment variable {route.api_key_env} is not set")
    upstream = route.upstream_model or route.name
    return OpenAIBackend(
        OpenAIBackendConfig(
            name=route.name,
            base_url=route.base_url,
            api_key=SecretStr(key) if key else None,
            models={serve_as or route.name: upstream},
            max_retries=route.max_retries,
            total_timeout_s=route.timeout_s,
            read_timeout_s=route.timeout_s,
        )
    )


async def build_models(settings: Settings) -> dict[str, ModelEntry]:
    """Build and start every backend; a model with fallbacks becomes a chain of backends.

    In-process backends (builtin, hf) are shared by every chain they appear in (they ignore the
    model name); an upstream member gets its own small client mapping the chain's model name to its
    own upstream model.
    """
    from steward.backends.builtin import EncoderBackend

    routes = {r.name: r for r in settings.models}
    own: dict[str, Backend] = {r.name: build_backend(r, settings) for r in settings.models}
    extra: list[Backend] = []
    if settings.embedding_model:
        own[settings.embedding_model] = EncoderBackend(settings.embedding_model)
    served: dict[str, Backend] = {}
    for name, backend in own.items():
        route = routes.get(name)
        if route is None or not route.fallbacks:
            served[name] = backend
            continue
        from steward.backends.resilience import FallbackChain

        members = [backend]
        for f in route.fallbacks:
            fr = routes[f]
            if fr.backend == "openai":
                m = build_backend(fr, settings, serve_as=name)
                extra.append(m)
                members.append(m)
            else:
                members.append(own[f])
        served[name] = FallbackChain(name, members)
    started: list[Backend] = []
    try:
        for b in [*own.values(), *extra]:
            await b.start()
            started.append(b)
    except BaseException:
        for b in started:
            await b.aclose()
        raise
    entries: dict[str, ModelEntry] = {}
    for name, backend in served.items():
        route = routes.get(name) or ModelRoute(name=name, backend="builtin")
        infos = {i.id: i for i in own[name].models()}
        info = (
            infos.get(name) or next(iter(infos.values()), None) or ModelInfo(id=name, backend=route.backend)
        )
        entries[name] = ModelEntry(route, backend, info)
    return entries


def stale_tenant_policies(
    tenants: list[dict[str, Any]], policy_names: list[str], source: object
) -> list[str]:
    """One line for every tenant bound to a guard policy the policy set does not define (renamed,
    removed, or set while the guards were off).

    Not a reason to refuse to start: one stale binding would take every tenant down, and the way
    to clear it (`PUT /admin/tenants/{id}`) is on the gateway itself. So the gateway starts, says
    so at start-up, and refuses only that tenant's requests (503 `policy_unavailable`) until an
    admin binds a policy that exists."""
    known = set(policy_names)
    where = f"the policy file {source}" if source is not None else "the built-in policy set"
    out = []
    for t in tenants:
        name = t.get("policy")
        if name and name not in known:
            out.append(
                f"tenant {t['id']!r} is bound to guard policy {name!r}, which {where} does not define "
                f"(it has: {', '.join(sorted(known))}); its requests are refused until an admin sets "
                f'PUT /admin/tenants/{t["id"]} {{"policy": ""}} or a policy that exists'
            )
    return out


async def _start(settings: Settings, models: dict[str, ModelEntry] | None) -> Gateway:
    from steward.gateway.limits import make_limiter
    from steward.store import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = upgrade(settings.resolved_database_url())
    keys = KeyStore(engine, ttl_s=settings.key_cache_ttl_s)
    limiter = make_limiter(settings.redis_url, engine, settings.workers)
    sink = None
    if settings.audit:
        from steward.gateway.audit_sink import AuditSink

        sink = AuditSink(
            engine,
            settings.data_dir,
            checkpoint_every=settings.audit_checkpoint_every,
            checkpoint_interval_s=settings.audit_checkpoint_interval_s,
            unauthenticated_per_minute=settings.audit_unauthenticated_per_minute,
        )
    guard = None
    if settings.guards:
        from steward.gateway.guarding import Guard
        from steward.guard.redact import load_hash_key

        guard = Guard(settings.guard_policies, hash_key=load_hash_key(settings.data_dir / "keys"))
        for line in stale_tenant_policies(keys.list_tenants(), guard.policy_names(), settings.guard_policies):
            log.warning(line)
        # Load the classifier heads and the encoder now, not on the first request.
        await guard.pipeline.scan_input([{"role": "user", "content": "warm up"}], None)
    entries = models if models is not None else await build_models(settings)
    gw = Gateway(settings, keys, limiter, entries, Metrics(), on_finish=sink.record if sink else None)
    gw.audit = sink
    gw.guard = guard
    return gw


async def _expire_payloads(gw: Gateway) -> None:
    """Payload retention: destroy the keys of payloads older than `payload_retention_days`, hourly.

    Metadata (the leaves) is kept; only the ciphertexts become unreadable, by key destruction.
    """
    retention_s = gw.settings.payload_retention_days * 86400
    while True:
        try:
            n = await asyncio.to_thread(gw.audit.log.expire_payloads, retention_s)
            if n:
                log.info(f"payload retention: destroyed {n} expired data keys")
        except Exception:
            log.exception("payload expiry failed")
        await asyncio.sleep(3600)


def create_app(settings: Settings, *, models: dict[str, ModelEntry] | None = None) -> FastAPI:
    """The ASGI app. `models` lets tests pass ready-made backends instead of building them."""
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            gw = await _start(settings, models)
        except Exception as exc:
            # One line that names the problem (bad key file, unreachable store, bad policy, ...);
            # uvicorn then exits non-zero without serving a request unaudited or unguarded.
            log.error(f"startup failed: {' '.join(str(exc).split()) or type(exc).__name__}")
            raise
        app.state.gateway = gw
        entries, limiter, sink, engine = gw.models, gw.limiter, gw.audit, gw.keys.engine
        expiry = asyncio.create_task(_expire_payloads(gw)) if sink is not None else None
        # Everything allocated so far (modules, models, the app) lives as long as the process: move it
        # out of the cyclic collector's reach, so a full collection under load walks only what
        # requests allocate instead of every object the imports made (a multi-ms pause each time).
        gc.collect()
        gc.freeze()
        gw.ready = True
        log.info(
            f"gateway ready on http://{settings.host}:{settings.port} "
            f"(models: {', '.join(sorted(entries))}); "
            "create a key with: steward keys create --tenant NAME --role user",
        )
        try:
            yield
        finally:
            gw.ready = False
            if expiry is not None:
                expiry.cancel()
            if models is None:
                closed: set[int] = set()
                for e in entries.values():
                    members = getattr(e.backend, "members", [e.backend])
                    for b in members:
                        if id(b) not in closed:
                            closed.add(id(b))
                            await b.aclose()
            await limiter.aclose()
            if sink is not None:
                sink.close()
            engine.dispose()

    app = FastAPI(
        title="Steward gateway",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    from steward.gateway.routes import admin, audit, health, moderations, openai

    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.include_router(audit.router)
    app.include_router(moderations.router)

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, KeyCreate, TenantUpdate):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    direct = {
        ("POST", "/v1/chat/completions"): openai.chat_completions,
        ("POST", "/v1/completions"): openai.completions,
        ("POST", "/v1/embeddings"): openai.embeddings,
    }
    app.add_middleware(GatewayMiddleware, max_body_bytes=settings.max_body_bytes, direct=direct)
    # Added last, so outermost: it answers whatever exception got past everything else (errors.py).
    app.add_middleware(UnhandledErrors)
    return app
