"""Export with offline verification, bad input, and the `steward audit` commands."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
    assert json.loads(lines[2])["type"] == "boundary" and json.loads(lines[2])["index"] == 4
    assert json.loads(lines[3])["event"]["request_id"] == "req-5"
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

    r = runner.invoke(app, ["audit", "checkpoint"])  # records itself first: the checkpoint covers it
    assert r.exit_code == 0 and "\n7\n" in r.output
    act = log.get_event(6)
    assert act.meta["kind"] == "admin" and act.meta["detail"]["action"] == "log.checkpoint"
    assert act.meta["principal"]["role"] == "cli" and act.meta["detail"]["os_user"]
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 0 and "verified" in r.output

    # proofs from the CLI verify against the signed checkpoint
    import base64

    from steward.audit.merkle import verify_consistency, verify_inclusion

    r = runner.invoke(app, ["audit", "proof", "--index", "3"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    cp = log.latest_checkpoint()
    assert cp is not None and p["tree_size"] == 7
    verify_inclusion(
        3, 7, base64.b64decode(p["leaf_hash"]), [base64.b64decode(h) for h in p["proof"]], cp.root
    )
    log.append_many([make_event(i) for i in range(6, 9)])
    cp10 = log.checkpoint()
    assert cp10 is not None and cp10.size == 10
    r = runner.invoke(app, ["audit", "consistency", "--first", "7", "--second", "10"])
    c = json.loads(r.output)
    verify_consistency(7, 10, [base64.b64decode(h) for h in c["proof"]], cp.root, cp10.root)
    assert runner.invoke(app, ["audit", "proof"]).exit_code != 0

    r = runner.invoke(app, ["audit", "erase", "--subject", "dora"])
    assert r.exit_code == 0 and "destroyed 1" in r.output
    assert "warning" not in r.output  # the write-ahead log was checkpointed and truncated
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0  # the CLI signed its record

    out = tmp_path / "e.jsonl"
    r = runner.invoke(app, ["audit", "export", "--since", "2000-01-01", "--out", str(out)])
    assert r.exit_code == 0 and "exported 12 event(s) (#0..#11)" in r.output, r.output
    pub = tmp_path / "data" / "keys" / PUBLIC_NAME
    r = runner.invoke(app, ["audit", "verify-export", str(out), "--public-key", str(pub)])
    assert r.exit_code == 0 and "12 event(s) (#0..#11, none missing)" in r.output, r.output
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    actions = [e["event"]["detail"].get("action") for e in exported if e["type"] == "event"]
    assert actions[-2:] == ["subject.erase", "log.export"]  # the export holds its own record

    out.write_text(out.read_text()[:-40])
    r = runner.invoke(app, ["audit", "verify-export", str(out), "--public-key", str(pub)])
    assert r.exit_code != 0 and isinstance(r.exception, ExportError)

    with engine.begin() as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.idx == 4).values(kind="admin"))
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1 and "event #4" in r.output

    r = runner.invoke(app, ["audit", "verify", "--public-key", str(tmp_path / "missing.pub")])
    assert r.exit_code != 0 and "cannot read public key" in str(r.exception)


Rec = dict[str, Any]


def _forge(out: Path, dest: Path, edit: Callable[[list[Rec]], list[Rec]], **end: Any) -> Path:
    """Rewrite an export as a forger would: edit the records, then recompute the unkeyed end line
    (count and digest) so that only what the checkpoint binds can give the edit away."""
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    body = edit([dict(r) for r in recs[:-1]])
    text = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in body)
    tail = {**recs[-1], "events": sum(r["type"] == "event" for r in body)}
    tail["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    tail.update(end)
    dest.write_text(text + json.dumps(tail, separators=(",", ":")) + "\n")
    return dest


def _at(recs: list[Rec], index: int) -> int:
    return next(i for i, r in enumerate(recs) if r["type"] == "event" and r["index"] == index)


def _without(*indexes: int) -> Callable[[list[Rec]], list[Rec]]:
    return lambda recs: [r for r in recs if not (r["type"] == "event" and r["index"] in indexes)]


def _duplicate(index: int) -> Callable[[list[Rec]], list[Rec]]:
    def edit(recs: list[Rec]) -> list[Rec]:
        i = _at(recs, index)
        return [*recs[: i + 1], recs[i], *recs[i + 1 :]]

    return edit


def _swap(a: int, b: int) -> Callable[[list[Rec]], list[Rec]]:
    def edit(recs: list[Rec]) -> list[Rec]:
        i, j = _at(recs, a), _at(recs, b)
        recs[i], recs[j] = recs[j], recs[i]
        return recs

    return edit


def _cut_start(recs: list[Rec]) -> list[Rec]:
    """Leave out #5 and #6, and pass #6 (which the export proves too) off as the boundary."""
    six = recs[_at(recs, 6)]
    recs = _without(5, 6)(recs)
    recs[0]["first"] = 7
    recs[2] = {"type": "boundary", "index": 6, "leaf": six["leaf"], "proof": six["proof"]}
    return recs


def _no_boundary(recs: list[Rec]) -> list[Rec]:
    return [r for r in recs if r["type"] != "boundary"]


def _first(n: int) -> Callable[[list[Rec]], list[Rec]]:
    def edit(recs: list[Rec]) -> list[Rec]:
        recs[0]["first"] = n
        return recs

    return edit


def _version(v: int) -> Callable[[list[Rec]], list[Rec]]:
    def edit(recs: list[Rec]) -> list[Rec]:
        recs[0]["version"] = v
        return recs

    return edit


def _same(recs: list[Rec]) -> list[Rec]:
    return recs


@pytest.mark.parametrize(
    ("edit", "end", "message"),
    [
        (_without(7), {}, r"event #7 is missing \(next record is #8; removed or out of order\)"),
        (_duplicate(7), {}, r"event #7 appears twice"),
        (_swap(7, 8), {}, r"event #7 is missing \(next record is #8; removed or out of order\)"),
        (_without(22), {}, r"event\(s\) #22 are missing: the checkpoint covers 23 events"),
        (_without(20, 21, 22), {}, r"event\(s\) #20\.\.#22 are missing: the checkpoint covers 23 events"),
        (_same, {"events": 17}, r"end record counts 17 events, found 18"),
        (_same, {"first": 6}, r"end record claims range first=6 size=23, the export holds #5\.\.#22"),
        (_same, {"size": 22}, r"end record claims range first=5 size=22"),
        (_same, {"sha256": "0" * 64}, r"content digest does not match"),
        (_cut_start, {"first": 7}, r"event #6, before the export's first event, is not older than since"),
        (_no_boundary, {}, r"no boundary record: cannot show that no event before #5 was left out"),
        (_first(6), {"first": 6}, r"boundary is event #4, not #5"),
        (_first(99), {"first": 99}, r"first index #99 is beyond the checkpoint's size 23"),
        (_version(1), {}, r"export version 1 cannot prove that no event was left out"),
    ],
    ids=[
        "removed",
        "duplicated",
        "reordered",
        "last-removed",
        "tail-removed",
        "count",
        "range-first",
        "range-size",
        "digest",
        "start-cut",
        "boundary-removed",
        "first-moved",
        "first-beyond",
        "version-1",
    ],
)
def test_verify_export_rejects_an_incomplete_export(
    exported: tuple[AuditLog, Path],
    keys_dir: Path,
    tmp_path: Path,
    edit: Callable[[list[Rec]], list[Rec]],
    end: dict[str, Any],
    message: str,
) -> None:
    _, out = exported
    forged = _forge(out, tmp_path / "forged.jsonl", edit, **end)
    with pytest.raises(ExportError, match=message) as err:
        verify_export(forged, load_verifier(keys_dir / PUBLIC_NAME))
    assert "\n" not in str(err.value)


def test_an_untampered_export_verifies_with_its_range(
    exported: tuple[AuditLog, Path], keys_dir: Path
) -> None:
    _, out = exported
    rewritten = _forge(out, out.with_name("same.jsonl"), _same)
    assert rewritten.read_bytes() == out.read_bytes()  # the forger's rewrite is byte-exact
    s = verify_export(out, load_verifier(keys_dir / PUBLIC_NAME))
    assert (s.first, s.events, s.tree_size) == (5, 18, 23)


def test_an_export_with_no_event_since_is_complete_too(
    exported: tuple[AuditLog, Path], keys_dir: Path, tmp_path: Path
) -> None:
    log, _ = exported
    out = tmp_path / "empty.jsonl"
    with out.open("w") as f:
        summary = export_events(log, f, datetime.now(UTC) + timedelta(days=1))
    assert (summary.first, summary.events) == (23, 0)
    s = verify_export(out, load_verifier(keys_dir / PUBLIC_NAME))
    assert (s.first, s.events, s.tree_size) == (23, 0, 23)
