"""Start a real gateway on a loopback port (uvicorn in a thread of the test process)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
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


def auth(key: str) -> dict[str, str]:
    """The Authorization header of an API key."""
    return {"authorization": f"Bearer {key}"}


def audit_gateway(data_dir: Path, **settings_kw: Any) -> Iterator[Running]:
    """A gateway with no embedding model and a checkpoint every 0.2 s: what the audit tests need."""
    settings = Settings(
        data_dir=data_dir,
        port=free_port(),
        embedding_model="",
        audit_checkpoint_interval_s=0.2,
        **settings_kw,
    )
    yield from start_gateway(settings)


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


STEWARD = [sys.executable, "-m", "steward.cli"]


def env_for(data: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "STEWARD_DATA_DIR": str(data), "OMP_NUM_THREADS": "1", "STEWARD_TORCH_THREADS": "1"}
    env.pop("STEWARD_DATABASE_URL", None)
    env.pop("STEWARD_REDIS_URL", None)
    env.pop("STEWARD_CONFIG", None)
    env.update(extra)
    return env


def steward(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEWARD, *args], env=env, capture_output=True, text=True, timeout=120)


@contextmanager
def serving(env: dict[str, str], *args: str, log: Path | None = None) -> Iterator[str]:
    port = free_port()
    log = log or Path(env["STEWARD_DATA_DIR"]) / f"serve-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sink = log.open("w")
    proc = subprocess.Popen(
        [*STEWARD, "serve", "--port", str(port), *args],
        env=env,
        stdout=sink,
        stderr=sink,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        sink.close()


class ThreadedUpstream:
    """A FakeUpstream on its own event loop in a thread, scriptable from the test thread."""

    def __init__(self, **kw: object) -> None:
        self.up = __import__("steward.backends.fake_upstream", fromlist=["FakeUpstream"]).FakeUpstream(**kw)  # type: ignore[arg-type]
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.up:
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def start_recording(settings: Settings) -> Iterator[tuple[Running, list[Any]]]:
    """`start_gateway`, also keeping every finished request's trace (in order) for the test."""
    records: list[Any] = []
    for running in start_gateway(settings):
        gateway: Any = running.gateway
        inner = gateway.on_finish

        def keep(trace: Any, inner: Any = inner) -> Any:
            records.append(trace)
            return inner(trace) if inner is not None else None

        gateway.on_finish = keep
        yield running, records


class ScriptedUpstream:
    """An OpenAI-compatible upstream on loopback whose answer to each request is `script(body)`: a
    dict (a JSON answer), an aiohttp response (sent as it is), or a list of chunks (an SSE stream
    ending in `[DONE]`). `seen` holds every request body."""

    def __init__(self, script: Any = None) -> None:
        import json

        from aiohttp import web

        self.script: Any = script if script is not None else (lambda body: [])
        self.seen: list[Any] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        ready = threading.Event()

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen.append(body)
            out = self.script(body)
            if isinstance(out, web.StreamResponse):
                return out
            if isinstance(out, dict):
                return web.json_response(out)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for c in out:
                await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", handle)
            app.router.add_post("/v1/completions", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            ready.set()
            await asyncio.Event().wait()

        threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
        assert ready.wait(10)
