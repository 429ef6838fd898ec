"""Which async HTTP client should the `openai` backend use? aiohttp vs httpx against the fake upstream.

Run:  python benchmarks/bench_upstream_client.py [--requests N] [--concurrency C] [--no-uvloop] [--json PATH]

Why: issue 3 asks to choose the upstream client by measurement (a bare FastAPI route with httpx was
seen at 190–450 req/s on this machine, aiohttp ~1,700). The gateway's own event loop is where the
client's CPU cost lands, so what matters is client CPU per request, measured here as req/s from one
in-process event loop against an upstream that is not the bottleneck.

What it does: starts `python -m steward.backends.fake_upstream` in a separate process (so the
server's CPU is not charged to the client's loop), then for each client — `aiohttp.ClientSession`
with a pooled `TCPConnector`, and `httpx.AsyncClient` with a pool of the same size — sends
non-streaming `POST /v1/chat/completions` requests (a small chat body, JSON-decoded answer, as the
backend does) and streaming ones (SSE read to `[DONE]`), first sequentially (one at a time:
per-request latency) and then with C concurrent workers (throughput). Each run is preceded by a
warm-up. Figures: req/s, and client-observed latency p50/p99 in ms. A third row, `backend`, runs
the same load through `steward.backends.openai.OpenAIBackend` (built on aiohttp) to show what its
retry/breaker/SSE/usage logic costs on top of the bare client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx

BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
}
STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_upstream(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "steward.backends.fake_upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("fake upstream did not start")


Send = Callable[[bool], Awaitable[None]]


async def _run(send: Send, n: int, concurrency: int, stream: bool) -> dict[str, float]:
    """n requests over `concurrency` workers; returns req/s and latency percentiles."""
    lat: list[float] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            await send(stream)
            lat.append(time.perf_counter() - t0)

    for _ in range(min(200, n)):  # warm-up: open the pool's connections, JIT-free but cache-warm
        await send(stream)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "req_s": n / wall,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


async def _bench_aiohttp(url: str, n: int, conc: int) -> dict[str, dict[str, float]]:
    connector = aiohttp.TCPConnector(limit=max(64, conc), keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=30, connect=5, sock_read=30)
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(stream: bool) -> None:
            data = json.dumps(STREAM_BODY if stream else BODY).encode()
            async with session.post(f"{url}/chat/completions", data=data, headers=headers) as r:
                if not stream:
                    json.loads(await r.read())
                    return
                async for line in r.content:
                    if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                        json.loads(line[6:])

        return await _suite(send, n, conc)


async def _bench_httpx(url: str, n: int, conc: int) -> dict[str, dict[str, float]]:
    limits = httpx.Limits(max_connections=max(64, conc), max_keepalive_connections=max(64, conc))
    timeout = httpx.Timeout(30, connect=5)
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def send(stream: bool) -> None:
            data = json.dumps(STREAM_BODY if stream else BODY).encode()
            if not stream:
                r = await client.post(f"{url}/chat/completions", content=data, headers=headers)
                json.loads(r.content)
                return
            async with client.stream("POST", f"{url}/chat/completions", content=data, headers=headers) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                        json.loads(line[6:])

        return await _suite(send, n, conc)


async def _bench_backend(url: str, n: int, conc: int) -> dict[str, dict[str, float]]:
    """The `openai` backend itself (aiohttp + retries, breaker, SSE parsing, usage checks)."""
    from steward.backends.base import Call
    from steward.backends.openai import OpenAIBackend

    backend = OpenAIBackend.from_config(
        {"name": "bench", "base_url": url, "api_key": "sk-bench", "models": {"m": "fake-model"}}
    )
    await backend.start()

    async def send(stream: bool) -> None:
        call = Call(dict(STREAM_BODY if stream else BODY), "fake-model", "bench")
        if stream:
            async for _ in backend.chat_stream(call):
                pass
        else:
            await backend.chat(call)

    try:
        return await _suite(send, n, conc)
    finally:
        await backend.aclose()


async def _suite(send: Send, n: int, conc: int) -> dict[str, dict[str, float]]:
    return {
        "sequential": await _run(send, n, 1, False),
        f"concurrent{conc}": await _run(send, n, conc, False),
        "stream_sequential": await _run(send, n // 2, 1, True),
        f"stream_concurrent{conc}": await _run(send, n // 2, conc, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    port = _free_port()
    proc = _start_upstream(port)
    url = f"http://127.0.0.1:{port}/v1"
    run: Any = asyncio.run
    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop

            run, loop_name = uvloop.run, "uvloop"
        except ImportError:
            print("uvloop not installed: using asyncio's loop")
    results: dict[str, Any] = {"loop": loop_name, "cpus": os.cpu_count()}
    try:
        results["aiohttp"] = run(_bench_aiohttp(url, args.requests, args.concurrency))
        results["httpx"] = run(_bench_httpx(url, args.requests, args.concurrency))
        results["backend"] = run(_bench_backend(url, args.requests, args.concurrency))
    finally:
        proc.terminate()
        proc.wait(5)

    print(f"loop={results['loop']} requests={args.requests} concurrency={args.concurrency}")
    print(f"{'client':8} {'mode':22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for client in ("aiohttp", "httpx", "backend"):
        for mode, r in results[client].items():
            print(f"{client:8} {mode:22} {r['req_s']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
