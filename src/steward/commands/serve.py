"""`steward serve`: the OpenAI-compatible gateway (uvicorn).

Settings are validated here, before uvicorn starts, so a bad config is one line and exit 2. Flags
are handed to workers through the environment (`STEWARD_*`), the same way a deployment sets them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer


def _no_tracebacks(record: logging.LogRecord) -> bool:
    """Startup failures are logged once, as one line, by the app; uvicorn's traceback copy is dropped."""
    return not str(record.msg).startswith("Traceback (most recent call last)")


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
        if settings.guards and settings.guard_policies is not None:
            from steward.guard import load_policy_set

            load_policy_set(settings.guard_policies)  # a bad policy file is one line, before binding
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
