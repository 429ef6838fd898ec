"""`steward serve`: the OpenAI-compatible gateway (uvicorn).

Settings are validated here, before uvicorn starts, so a bad config is one line and exit 2. Flags
are handed to workers through the environment (`STEWARD_*`), the same way a deployment sets them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from steward.gateway.settings import Settings


def _no_tracebacks(record: logging.LogRecord) -> bool:
    """Startup failures are logged once, as one line, by the app; uvicorn's traceback copy is dropped."""
    return not str(record.msg).startswith("Traceback (most recent call last)")


def _preflight(settings: Settings) -> None:
    """What the gateway would otherwise find out only while starting (after uvicorn has taken over
    the output, as several JSON log lines and exit 3), checked here as one line and exit 2: the
    host, the database and Redis URLs, the model directories and upstream keys, the store itself
    (opened and migrated, as the gateway would) and the policy file. A tenant bound to a policy the
    file does not define is a `warning:` line, not a refusal (`stale_tenant_policies`)."""
    import socket

    from steward.gateway.settings import ConfigError

    try:
        socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or " ".join(str(exc).split())
        raise ConfigError(f"invalid setting host: cannot use {settings.host!r} ({why})") from None

    from steward.store.db import StoreError, _normalise

    url = settings.resolved_database_url()
    try:
        _normalise(url)
    except StoreError as exc:
        raise ConfigError(f"invalid setting database_url: {exc}") from None
    if settings.redis_url:
        from redis.asyncio.connection import parse_url

        try:
            parse_url(settings.redis_url)
        except ValueError as exc:
            raise ConfigError(f"invalid setting redis_url: {' '.join(str(exc).split())}") from None
    for i, m in enumerate(settings.models):
        if m.backend in ("builtin", "hf") and m.path is not None and not m.path.is_dir():
            raise ConfigError(
                f"invalid setting models.{i}.path: model {m.name!r}: directory not found: {m.path}"
            )
        if m.backend == "hf" and m.path is not None:
            _check_hf_model(i, m.name, m.path)
        if m.api_key_env and not os.environ.get(m.api_key_env):
            raise ConfigError(
                f"invalid setting models.{i}.api_key_env: model {m.name!r}: environment variable "
                f"{m.api_key_env} is not set"
            )

    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"invalid setting data_dir: cannot create {settings.data_dir}: {exc.strerror or exc}"
        ) from None
    from steward.gateway.keys import KeyStore
    from steward.store import upgrade

    try:
        engine = upgrade(url)
    except StoreError as exc:
        raise ConfigError(f"database_url: {exc}") from None
    except ImportError as exc:  # a database driver that is not installed
        raise ConfigError(f"database_url: {exc}") from None
    try:
        bound = [t for t in KeyStore(engine).list_tenants() if t.get("policy")]
    finally:
        engine.dispose()

    if settings.guards and (settings.guard_policies is not None or bound):
        from steward.gateway.app import stale_tenant_policies
        from steward.guard import load_policy_set

        pset = load_policy_set(settings.guard_policies)  # a bad policy file is one line, before binding
        for line in stale_tenant_policies(bound, sorted(pset.policies), settings.guard_policies):
            print(f"warning: {line}", file=sys.stderr)


def _check_hf_model(i: int, name: str, path: Path) -> None:
    """An hf model directory the gateway could not serve (no usable tokenizer, not a causal LM,
    corrupt safetensors, a bad config.json) is refused here, in one line, not after startup."""
    from steward.backends.base import BackendError
    from steward.backends.hf import check_model_dir
    from steward.gateway.settings import ConfigError

    try:
        check_model_dir(path)
    except BackendError as exc:
        raise ConfigError(f"invalid setting models.{i}.path: model {name!r}: {exc.message}") from None


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        host: str | None = typer.Option(None, "--host", help="bind address (default 127.0.0.1)"),
        port: int | None = typer.Option(None, "--port", help="port (default 8000)"),
        workers: int | None = typer.Option(None, "--workers", help="worker processes (default 1)"),
        config: Path | None = typer.Option(None, "--config", help="YAML settings file"),
    ) -> None:
        """Serve the gateway with the configured models (the built-in model by default)."""
        import uvicorn

        from steward.gateway.app import configure_logging
        from steward.gateway.settings import load_settings

        overrides = {"host": host, "port": port, "workers": workers}
        settings = load_settings(config, **overrides)
        for name, value in overrides.items():
            if value is not None:
                os.environ[f"STEWARD_{name.upper()}"] = str(value)
        if config is not None:
            os.environ["STEWARD_CONFIG"] = str(config.resolve())
        os.environ["STEWARD_DATA_DIR"] = str(settings.data_dir.resolve())
        _preflight(settings)
        configure_logging(settings.log_level)
        for name in ("uvicorn", "uvicorn.error"):
            lg = logging.getLogger(name)
            lg.handlers[:] = logging.getLogger("steward").handlers
            lg.setLevel(settings.log_level.upper())
            lg.propagate = False
            lg.addFilter(_no_tracebacks)
        uvicorn.run(
            "steward.gateway.asgi:app_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            http="httptools",
            loop="uvloop",
            timeout_graceful_shutdown=30,
        )
