"""Throwaway PostgreSQL and Redis servers for the store and limiter tests.

The servers come from Debian's packages (`postgresql`, `redis-server`), run from a temporary directory
on a free loopback port, and are stopped and deleted when the session ends, so the tests need no
running services and leave nothing behind. PostgreSQL refuses to run as root, so under root it runs as
the `postgres` system user (via `runuser`) in a directory that user owns.

Where a binary is missing the tests that need it are skipped with a loud reason; under `CI=true` they
fail instead, because CI installs both and a skip there would hide untested code.

Fixtures: `pg_url` / `redis_url` (session: the servers), `fresh_pg_url` (a new empty database per
test), `fresh_redis_url` (the Redis server, flushed before the test).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0


def missing(what: str) -> None:
    """Skip loudly, or fail under CI where every server must run."""
    message = f"{what}: the PostgreSQL/Redis tests cannot run here (apt-get install postgresql redis-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} [CI=true: a missing server fails the run]")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pg_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL bin directory, else the one holding `initdb` on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True
    )
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """One PostgreSQL cluster in a temp dir; `start()` blocks until it accepts connections."""

    def __init__(self) -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL's initdb not found (/usr/lib/postgresql/*/bin)")
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        if self.as_root and shutil.which("runuser") is None:
            raise FileNotFoundError("running as root but `runuser` is missing to drop to `postgres`")
        self.port = 0
        self.tmp: Path | None = None

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self.as_root else list(args)

    @property
    def datadir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="steward-pg-"))
        if self.as_root:
            shutil.chown(self.tmp, "postgres", "postgres")
        subprocess.run(
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ),
            check=True,
            capture_output=True,
            cwd=self.tmp,  # a directory the postgres user can enter
        )
        last = ""
        for _ in range(3):  # the free port can be taken between choosing and binding it
            self.port = free_port()
            opts = (
                f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            proc = subprocess.run(
                self._cmd(
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-o",
                    opts,
                    "-l",
                    str(self.tmp / "log"),
                    "-w",
                    "-t",
                    str(int(START_TIMEOUT_S)),
                    "start",
                ),
                capture_output=True,
                text=True,
                cwd=self.tmp,
            )
            if proc.returncode == 0:
                return
            last = proc.stderr + (self.tmp / "log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start: {last}")

    def stop(self) -> None:
        if self.tmp is None:
            return
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run(
                self._cmd(
                    str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"
                ),
                capture_output=True,
            )
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    @property
    def dsn(self) -> str:
        """libpq DSN of the maintenance database, for creating and dropping test databases."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RedisServer:
    """One `redis-server` without persistence in a temp dir; `start()` blocks until it answers PING."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found on PATH")
        self.binary = binary
        self.port = 0
        self.tmp: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="steward-redis-"))
        for _ in range(3):
            self.port = free_port()
            log = open(self.tmp / "log", "wb")  # noqa: SIM115 - handed to the child
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.tmp),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
            log.close()
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._ping():
                    return
                time.sleep(0.02)
            self._kill()
        text = (self.tmp / "log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"redis-server did not start: {text}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(16).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")


@contextlib.contextmanager
def running(server: PostgresServer | RedisServer) -> Iterator[None]:
    server.start()
    try:
        yield
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        missing(str(exc))
    with running(server):
        yield server


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> str:
    """A database on the session's PostgreSQL, shared by every test that asks (see `fresh_pg_url`)."""
    return pg_server.create_database()


@pytest.fixture
def fresh_pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A new empty database for one test, dropped (connections and all) after it."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer()
    except FileNotFoundError as exc:
        missing(str(exc))
    with running(server):
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def fresh_redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, flushed first so each test starts from empty (tests share one server)."""
    redis_server.flush()
    return redis_server.url
