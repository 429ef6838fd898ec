"""Export events with proofs as JSONL, and verify such an export with nothing but the public key.

Layout, one JSON object per line:

    {"type": "header", "format": "steward-audit-export", "version": 1, "origin": ..., "since": ...}
    {"type": "checkpoint", "note": "<signed note>"}
    {"type": "event", "index": i, "leaf": base64, "event": {...}, "proof": [base64, ...]}   (0..n)
    {"type": "end", "events": n, "sha256": "<hex of every byte before this line>"}

Each event's inclusion proof leads to the checkpoint's root, and the checkpoint is signed, so an
auditor needs neither the store nor Steward's keys (payloads stay encrypted). The `end` line makes
truncation detectable even at a line boundary.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select

from steward.audit import merkle
from steward.audit.events import EventError, StoredEvent, format_time, time_us
from steward.audit.log import AuditLog
from steward.audit.merkle import MemoryTree, ProofError
from steward.audit.note import NoteError, Verifier
from steward.audit.schema import CHECKPOINTS, EVENTS

FORMAT = "steward-audit-export"
VERSION = 1


class ExportError(ValueError):
    """An export cannot be written, or a file is not a valid, complete, verifiable export."""


@dataclass(frozen=True)
class ExportSummary:
    events: int
    tree_size: int
    origin: str


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def export_events(log: AuditLog, out: IO[str], since: Any) -> ExportSummary:
    """Write every event with time >= `since` (aware datetime) that a checkpoint covers.

    Signs a checkpoint first so the export includes events up to now. Proofs come from an in-memory
    tree built from the stored leaf hashes, whose root must equal the signed one (else the store was
    tampered with and `audit verify` says where).
    """
    if log.signer is not None:
        log.checkpoint()
    since_us = time_us(since)
    with log.engine.connect() as conn:
        row = conn.execute(
            select(CHECKPOINTS.c.size, CHECKPOINTS.c.root_hash, CHECKPOINTS.c.note)
            .order_by(CHECKPOINTS.c.size.desc())
            .limit(1)
        ).first()
        if row is None:
            raise ExportError("nothing to export: the log has no signed checkpoint")
        size, root, note = int(row[0]), bytes(row[1]), str(row[2])
        tree = MemoryTree()
        for (h,) in conn.execution_options(stream_results=True, yield_per=10_000).execute(
            select(EVENTS.c.leaf_hash).where(EVENTS.c.idx < size).order_by(EVENTS.c.idx)
        ):
            tree.append(bytes(h))
        if tree.size != size or tree.root() != root:
            raise ExportError("the store does not match its latest checkpoint; run `steward audit verify`")
        digest = hashlib.sha256()

        def emit(obj: dict[str, Any]) -> None:
            line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"
            digest.update(line.encode())
            out.write(line)

        origin = log.origin or ""
        emit(
            {
                "type": "header",
                "format": FORMAT,
                "version": VERSION,
                "origin": origin,
                "since": format_time(since),
            }
        )
        emit({"type": "checkpoint", "note": note})
        n = 0
        for idx, leaf in conn.execution_options(stream_results=True, yield_per=2_000).execute(
            select(EVENTS.c.idx, EVENTS.c.leaf)
            .where(EVENTS.c.time_us >= since_us, EVENTS.c.idx < size)
            .order_by(EVENTS.c.idx)
        ):
            leaf = bytes(leaf)
            ev = StoredEvent.from_leaf(leaf)
            if merkle.leaf_hash(leaf) != tree.node(0, idx):
                raise ExportError(f"event #{idx} does not match its leaf hash; run `steward audit verify`")
            proof = merkle.inclusion_proof(idx, size, tree)
            emit(
                {
                    "type": "event",
                    "index": idx,
                    "leaf": _b64(leaf),
                    "event": ev.meta,
                    "proof": [_b64(p) for p in proof],
                }
            )
            n += 1
    line = (
        json.dumps({"type": "end", "events": n, "sha256": digest.hexdigest()}, separators=(",", ":")) + "\n"
    )
    out.write(line)
    return ExportSummary(n, size, origin)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        f = path.open("rb")
    except OSError as exc:
        raise ExportError(f"cannot read export {path}: {exc.strerror}") from None
    with f:
        yield from enumerate(f, 1)


def verify_export(path: Path, verifier: Verifier) -> ExportSummary:
    """Check an export offline: signature, every leaf's proof, completeness. Raises ExportError."""
    digest = hashlib.sha256()
    header: dict[str, Any] | None = None
    cp = None
    n = 0
    ended = False
    for no, raw in _lines(path):
        if ended:
            raise ExportError(f"{path}:{no}: data after the end record")
        if not raw.endswith(b"\n"):
            raise ExportError(f"{path}:{no}: last line is cut off (truncated export)")
        try:
            obj = json.loads(raw)
        except ValueError:
            raise ExportError(f"{path}:{no}: not JSON (corrupt or truncated export)") from None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if header is None:
            if kind != "header" or obj.get("format") != FORMAT:
                raise ExportError(f"{path}: not a Steward audit export (no header)")
            if obj.get("version") != VERSION:
                raise ExportError(f"{path}: export version {obj.get('version')!r} is not supported")
            header = obj
        elif kind == "checkpoint" and cp is None:
            try:
                cp = verifier.verify(str(obj.get("note", "")))
            except NoteError as exc:
                raise ExportError(f"{path}:{no}: {exc}") from None
            if cp.origin != header.get("origin"):
                raise ExportError(f"{path}:{no}: checkpoint origin differs from the header")
        elif kind == "event":
            if cp is None:
                raise ExportError(f"{path}:{no}: event before the checkpoint")
            _check_event(obj, cp.size, cp.root, f"{path}:{no}")
            n += 1
        elif kind == "end":
            if obj.get("events") != n:
                raise ExportError(f"{path}:{no}: end record counts {obj.get('events')} events, found {n}")
            if obj.get("sha256") != digest.hexdigest():
                raise ExportError(f"{path}:{no}: content digest does not match (export was altered)")
            ended = True
            continue
        else:
            raise ExportError(f"{path}:{no}: unexpected record {kind!r}")
        digest.update(raw)
    if header is None:
        raise ExportError(f"{path}: empty file, not an export")
    if cp is None:
        raise ExportError(f"{path}: no checkpoint (truncated export)")
    if not ended:
        raise ExportError(f"{path}: no end record (truncated export)")
    return ExportSummary(n, cp.size, cp.origin)


def _check_event(obj: dict[str, Any], size: int, root: bytes, where: str) -> None:
    try:
        idx = obj["index"]
        leaf = base64.b64decode(obj["leaf"], validate=True)
        proof = [base64.b64decode(p, validate=True) for p in obj["proof"]]
    except (KeyError, TypeError, binascii.Error):
        raise ExportError(f"{where}: malformed event record") from None
    if not isinstance(idx, int):
        raise ExportError(f"{where}: malformed event index")
    try:
        ev = StoredEvent.from_leaf(leaf)
    except EventError as exc:
        raise ExportError(f"{where}: {exc}") from None
    if ev.index != idx or ev.meta != obj.get("event"):
        raise ExportError(f"{where}: event #{idx} does not match its leaf")
    try:
        merkle.verify_inclusion(idx, size, merkle.leaf_hash(leaf), proof, root)
    except ProofError as exc:
        raise ExportError(f"{where}: event #{idx}: {exc}") from None
