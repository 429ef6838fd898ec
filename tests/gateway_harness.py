"""Start a real gateway on a loopback port (uvicorn in a thread of the test process)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from steward.gateway.app import create_app
from steward.gateway.keys import KeyStore
from steward.gateway.settings import Settings
from steward.store import upgrade


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    settings: Settings
    keys: KeyStore
    app: object
    server: uvicorn.Server

    def key(self, tenant: str = "acme", role: str = "user", **kw: object) -> str:
        k, _ = self.keys.create(tenant, role, **kw)  # type: ignore[arg-type]
        return k

    @property
    def gateway(self) -> object:
        return self.app.state.gateway  # type: ignore[attr-defined]


def start_gateway(settings: Settings) -> Iterator[Running]:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        log_config=None,
        access_log=False,
        loop="asyncio",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.05)
    keys = KeyStore(upgrade(settings.resolved_database_url()), ttl_s=0.0)
    try:
        yield Running(f"http://127.0.0.1:{settings.port}", settings, keys, app, server)
    finally:
        server.should_exit = True
        thread.join(30)
        keys.engine.dispose()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]
