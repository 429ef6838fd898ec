"""`steward audit` with bad input: refused before anything is recorded or written, and a verifier
that never creates or migrates the store it checks (review 1: M6, M7, L1, L6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from steward.audit.log import AuditLog
from steward.commands import audit as audit_cmd

from .helpers import make_event


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    audit_cmd.register(app)
    return app


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """A data directory with a migrated store, a signing key and six events (signed)."""
    monkeypatch.setenv("STEWARD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("STEWARD_DATABASE_URL", raising=False)
    from steward.store.db import make_engine
    from steward.store.migrate import upgrade

    engine = upgrade(make_engine())
    log = AuditLog.open(engine, tmp_path / "data" / "keys", checkpoint_every=1000)
    log.append_many([make_event(i) for i in range(6)])
    log.checkpoint()
    return engine


def _events(engine: Engine, tmp_path: Path) -> list[dict[str, object]]:
    log = AuditLog.open(engine, tmp_path / "data" / "keys", create_signing_key=False)
    return [log.get_event(i).meta for i in range(log.size())]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steward.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


# -- M6: export --out ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["directory", "empty", "missing parent"])
def test_export_to_a_bad_out_is_refused_before_anything_is_recorded(
    store: Engine, tmp_path: Path, kind: str
) -> None:
    if kind == "directory":
        out = tmp_path / "outdir"
        out.mkdir()
        arg = str(out)
    elif kind == "empty":
        out, arg = Path("."), ""
    else:
        out = tmp_path / "no-such-dir" / "e.jsonl"
        arg = str(out)
    before = _events(store, tmp_path)
    r = CliRunner().invoke(_app(), ["audit", "export", "--since", "2000-01-01", "--out", arg])
    assert r.exit_code != 0 and isinstance(r.exception, ValueError), r.output
    assert "--out" in str(r.exception)
    assert _events(store, tmp_path) == before  # no "ok" record for an export that never ran
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "outdir.partial").exists()


def test_a_failed_rename_is_recorded_as_an_error_and_leaves_no_partial(
    store: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "e.jsonl"

    def fail(self: Path, target: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", fail)
    r = CliRunner().invoke(_app(), ["audit", "export", "--since", "2000-01-01", "--out", str(out)])
    monkeypatch.undo()
    assert r.exit_code != 0 and isinstance(r.exception, OSError)
    assert not out.exists() and not (tmp_path / "e.jsonl.partial").exists()
    acts = [e for e in _events(store, tmp_path) if e.get("kind") == "admin"]
    outcomes = [
        (a["outcome"], a["detail"].get("error")) for a in acts if a["detail"]["action"] == "log.export"
    ]
    assert outcomes[-1] == ("error", "OSError"), outcomes


# -- M7: verify never creates or migrates ----------------------------------------------------------
def test_verify_refuses_a_missing_store_and_creates_nothing(store: Engine, tmp_path: Path) -> None:
    typo = tmp_path / "no-such-dir" / "stewrad.db"
    runner = CliRunner()
    for cmd in (["verify"], ["proof", "--index", "0"], ["consistency", "--first", "1", "--second", "2"]):
        r = runner.invoke(_app(), ["audit", *cmd, "--db", f"sqlite:///{typo}"])
        assert r.exit_code != 0 and "no audit store" in str(r.exception), (cmd, r.output, r.exception)
        assert not typo.exists() and not typo.parent.exists()


def test_verify_does_not_migrate_an_unmigrated_store(store: Engine, tmp_path: Path) -> None:
    import sqlite3

    other = tmp_path / "other.db"
    sqlite3.connect(other).close()  # an empty SQLite file: not a Steward store
    r = CliRunner().invoke(_app(), ["audit", "verify", "--db", f"sqlite:///{other}"])
    assert r.exit_code != 0 and "no audit store" in str(r.exception), r.output
    with sqlite3.connect(other) as conn:
        assert conn.execute("select name from sqlite_master").fetchall() == []


def test_verify_still_verifies_a_real_store(store: Engine) -> None:
    r = CliRunner().invoke(_app(), ["audit", "verify"])
    assert r.exit_code == 0 and "audit log verified" in r.output, r.output


def test_verify_missing_default_store_is_one_line(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")}
    env["STEWARD_DATA_DIR"] = str(tmp_path / "fresh")
    r = _cli("audit", "verify", env=env)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("steward: error: no audit store at ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "fresh").exists()


# -- L1: --since out of range ----------------------------------------------------------------------
@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+01:00", "bogus"])
def test_since_out_of_range_or_bad_is_one_error_naming_since(
    store: Engine, tmp_path: Path, since: str
) -> None:
    before = _events(store, tmp_path)
    r = CliRunner().invoke(_app(), ["audit", "export", "--since", since, "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code != 0 and isinstance(r.exception, ValueError), r.output
    assert str(r.exception).startswith("--since: ")
    assert _events(store, tmp_path) == before and not (tmp_path / "x.jsonl").exists()


# -- L6: erase --subject '' ------------------------------------------------------------------------
@pytest.mark.parametrize("subject", ["", "s" * 257])
def test_erase_refuses_an_empty_or_overlong_subject(store: Engine, tmp_path: Path, subject: str) -> None:
    before = _events(store, tmp_path)
    r = CliRunner().invoke(_app(), ["audit", "erase", "--subject", subject])
    assert r.exit_code != 0 and isinstance(r.exception, ValueError), r.output
    assert "--subject" in str(r.exception)
    assert _events(store, tmp_path) == before  # no subject.erase record


def test_erase_accepts_a_normal_subject(store: Engine) -> None:
    r = CliRunner().invoke(_app(), ["audit", "erase", "--subject", "dora"])
    assert r.exit_code == 0 and "destroyed 0" in r.output, r.output
