"""Export with offline verification, bad input, and the `steward audit` commands."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from sqlalchemy import update
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from steward.audit.export import ExportError, export_events, verify_export
from steward.audit.log import AuditLog
from steward.audit.note import PUBLIC_NAME, NoteError, Verifier, load_verifier
from steward.audit.schema import EVENTS
from steward.commands import audit as audit_cmd

from .helpers import make_event


@pytest.fixture
def exported(sqlite_engine: Engine, keys_dir: Path, tmp_path: Path) -> tuple[AuditLog, Path]:
    log = AuditLog.open(sqlite_engine, keys_dir, checkpoint_every=10, checkpoint_interval_s=3600)
    old = [make_event(i) for i in range(5)]
    old = [type(e)(**{**e.__dict__, "time": datetime.now(UTC) - timedelta(days=2)}) for e in old]
    log.append_many(old)
    log.append_many([make_event(i) for i in range(5, 23)])  # 3 unsigned at the end; export signs
    out = tmp_path / "export.jsonl"
    with out.open("w") as f:
        summary = export_events(log, f, datetime.now(UTC) - timedelta(days=1))
    assert (summary.events, summary.tree_size) == (18, 23)
    return log, out


def test_export_verifies_offline(exported: tuple[AuditLog, Path], keys_dir: Path) -> None:
    _, out = exported
    s = verify_export(out, load_verifier(keys_dir / PUBLIC_NAME))
    assert (s.events, s.tree_size) == (18, 23)
    lines = out.read_text().splitlines()
    assert json.loads(lines[2])["event"]["request_id"] == "req-5"
    # Payloads stay encrypted. (Not a bare "4111": hex digests in the export contain it by chance.)
    text = out.read_text()
    assert "4111 1111" not in text and "Quackenbush" not in text


def test_export_bad_input(exported: tuple[AuditLog, Path], keys_dir: Path, tmp_path: Path) -> None:
    _, out = exported
    v = load_verifier(keys_dir / PUBLIC_NAME)
    data = out.read_bytes()
    bad = tmp_path / "bad.jsonl"
    cases = {
        "cut mid-line": data[: len(data) // 2],
        "cut at a line": b"".join(data.splitlines(keepends=True)[:-3]),
        "no checkpoint": b"".join(data.splitlines(keepends=True)[:1]),
        "empty": b"",
    }
    for why, blob in cases.items():
        bad.write_bytes(blob)
        with pytest.raises(ExportError, match=r"truncated|not an export|not JSON|cut off"):
            verify_export(bad, v)
        assert why
    lines = data.splitlines(keepends=True)
    ev = json.loads(lines[5])
    ev["event"]["outcome"] = "forged"
    bad.write_bytes(b"".join([*lines[:5], (json.dumps(ev) + "\n").encode(), *lines[6:]]))
    with pytest.raises(ExportError, match="does not match its leaf"):
        verify_export(bad, v)
    with pytest.raises(ExportError, match="cannot read"):
        verify_export(tmp_path / "nope.jsonl", v)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from steward.audit.note import Signer

    wrong = Signer(v.name, Ed25519PrivateKey.generate()).verifier
    with pytest.raises(ExportError, match="no signature by this public key"):
        verify_export(out, Verifier.parse(wrong.vkey()))


def test_export_refuses_a_tampered_store(exported: tuple[AuditLog, Path], tmp_path: Path) -> None:
    log, _ = exported
    with log.engine.begin() as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.idx == 3).values(leaf_hash=b"\x00" * 32))
    with (tmp_path / "x.jsonl").open("w") as f, pytest.raises(ExportError, match="audit verify"):
        export_events(log, f, datetime.now(UTC) - timedelta(days=10))


def test_note_parsing_rejects_garbage(keys_dir: Path, exported: tuple[AuditLog, Path]) -> None:
    v = load_verifier(keys_dir / PUBLIC_NAME)
    log, _ = exported
    cp = log.latest_checkpoint()
    assert cp is not None
    for broken in (
        "",
        cp.note[:-1],
        cp.note.replace("\n\n", "\n"),
        cp.note.replace("\u2014", "-"),
        cp.note.split("\n")[0] + "\nx\n" + cp.note.split("\n", 2)[2],
    ):
        with pytest.raises(NoteError):
            v.verify(broken)
    for key in ("", "a+b", "name+00000000+AAAA", "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----"):
        with pytest.raises(NoteError):
            Verifier.parse(key)
    # the PEM form of the right key works too
    from cryptography.hazmat.primitives import serialization

    pem = v.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert Verifier.parse(pem.decode()).verify(cp.note).size == cp.size


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    audit_cmd.register(app)
    return app


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEWARD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("STEWARD_DATABASE_URL", raising=False)
    from steward.store.db import make_engine
    from steward.store.migrate import upgrade

    engine = upgrade(make_engine())
    log = AuditLog.open(engine, tmp_path / "data" / "keys", checkpoint_every=1000)
    log.append_many([make_event(i, subject="dora" if i == 2 else None) for i in range(6)])
    runner = CliRunner()
    app = _app()

    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1 and "unsigned" in r.output
    assert runner.invoke(app, ["audit", "verify", "--allow-unsigned-tail"]).exit_code == 0

    r = runner.invoke(app, ["audit", "checkpoint"])
    assert r.exit_code == 0 and "\n6\n" in r.output
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 0 and "verified" in r.output

    # proofs from the CLI verify against the signed checkpoint
    import base64

    from steward.audit.merkle import verify_consistency, verify_inclusion

    r = runner.invoke(app, ["audit", "proof", "--index", "3"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    cp = log.latest_checkpoint()
    assert cp is not None and p["tree_size"] == 6
    verify_inclusion(
        3, 6, base64.b64decode(p["leaf_hash"]), [base64.b64decode(h) for h in p["proof"]], cp.root
    )
    log.append_many([make_event(i) for i in range(6, 9)])
    cp9 = log.checkpoint()
    assert cp9 is not None
    r = runner.invoke(app, ["audit", "consistency", "--first", "6", "--second", "9"])
    c = json.loads(r.output)
    verify_consistency(6, 9, [base64.b64decode(h) for h in c["proof"]], cp.root, cp9.root)
    assert runner.invoke(app, ["audit", "proof"]).exit_code != 0

    r = runner.invoke(app, ["audit", "erase", "--subject", "dora"])
    assert r.exit_code == 0 and "destroyed 1" in r.output
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0

    out = tmp_path / "e.jsonl"
    r = runner.invoke(app, ["audit", "export", "--since", "2000-01-01", "--out", str(out)])
    assert r.exit_code == 0 and "exported 9" in r.output, r.output
    pub = tmp_path / "data" / "keys" / PUBLIC_NAME
    r = runner.invoke(app, ["audit", "verify-export", str(out), "--public-key", str(pub)])
    assert r.exit_code == 0 and "9 event(s)" in r.output

    out.write_text(out.read_text()[:-40])
    r = runner.invoke(app, ["audit", "verify-export", str(out), "--public-key", str(pub)])
    assert r.exit_code != 0 and isinstance(r.exception, ExportError)

    with engine.begin() as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.idx == 4).values(kind="admin"))
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1 and "event #4" in r.output

    r = runner.invoke(app, ["audit", "verify", "--public-key", str(tmp_path / "missing.pub")])
    assert r.exit_code != 0 and "cannot read public key" in str(r.exception)
