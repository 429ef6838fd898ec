"""Export events with proofs as JSONL, and verify such an export with nothing but the public key.

Layout, one JSON object per line:

    {"type": "header", "format": "steward-audit-export", "version": 2, "origin": ..., "since": ...,
     "first": f}
    {"type": "checkpoint", "note": "<signed note>"}
    {"type": "boundary", "index": f-1, "leaf": base64, "proof": [base64, ...]}          (when f > 0)
    {"type": "event", "index": i, "leaf": base64, "event": {...}, "proof": [base64, ...]}  (i = f..n-1)
    {"type": "end", "first": f, "size": n, "events": n - f, "sha256": "<hex of every byte before>"}

An export is every event from index `f` (the first whose time is at or after `since`) to the end of
the signed checkpoint of size `n`: a contiguous range, so completeness is checkable offline. Each
event's inclusion proof leads to the checkpoint's root, and the checkpoint is signed, so an auditor
needs neither the store nor Steward's keys (payloads stay encrypted). The verifier demands every
index from `f` to `n - 1` exactly once, in order, so an event removed, duplicated or moved is
caught whatever the `end` line says; the range ends at the signed size, so nothing can be cut from
the end either. The start is held by the `boundary` record: the event just before `f`, proved
against the same checkpoint, must be older than `since` (and event `f` not), so leaving out events
at the start needs a later `since` in the header, which the verifier prints. (Event times follow
indexes up to the commit delay, milliseconds: only events that close to `since` could be cut at
the start with `since` unchanged.) The `end` line's digest makes any other edit visible, and
truncation detectable even at a line boundary.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select

from steward.audit import merkle
from steward.audit.events import EventError, StoredEvent, format_time, parse_time, time_us
from steward.audit.log import AuditLog
from steward.audit.merkle import MemoryTree, ProofError
from steward.audit.note import Checkpoint, NoteError, Verifier
from steward.audit.schema import CHECKPOINTS, EVENTS
from steward.store.db import reading

FORMAT = "steward-audit-export"
VERSION = 2  # 1 had no range: it could not show that no event was left out


class ExportError(ValueError):
    """An export cannot be written, or a file is not a valid, complete, verifiable export."""


@dataclass(frozen=True)
class ExportSummary:
    events: int
    tree_size: int
    origin: str
    first: int = 0  # the events are #first..#tree_size - 1, every one of them


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def export_events(log: AuditLog, out: IO[str], since: Any) -> ExportSummary:
    """Write every event from the first with time >= `since` (aware datetime) to the end of the
    latest checkpoint, with proofs (see the module docstring).

    Signs a checkpoint first so the export includes events up to now. Proofs come from an in-memory
    tree built from the stored leaf hashes, whose root must equal the signed one (else the store was
    tampered with and `audit verify` says where).
    """
    if log.signer is not None:
        log.checkpoint()
    since_us = time_us(since)
    with reading(log.engine).connect() as conn:
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
        found = conn.execute(
            select(func.min(EVENTS.c.idx)).where(EVENTS.c.time_us >= since_us, EVENTS.c.idx < size)
        ).scalar()
        first = size if found is None else int(found)
        digest = hashlib.sha256()

        def emit(obj: dict[str, Any]) -> None:
            line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"
            digest.update(line.encode())
            out.write(line)

        def leaf_of(idx: int, leaf: bytes) -> bytes:
            if merkle.leaf_hash(leaf) != tree.node(0, idx):
                raise ExportError(f"event #{idx} does not match its leaf hash; run `steward audit verify`")
            return leaf

        origin = log.origin or ""
        emit(
            {
                "type": "header",
                "format": FORMAT,
                "version": VERSION,
                "origin": origin,
                "since": format_time(since),
                "first": first,
            }
        )
        emit({"type": "checkpoint", "note": note})
        if first > 0:
            b = conn.execute(select(EVENTS.c.leaf).where(EVENTS.c.idx == first - 1)).scalar_one()
            leaf = leaf_of(first - 1, bytes(b))
            proof = merkle.inclusion_proof(first - 1, size, tree)
            emit(
                {
                    "type": "boundary",
                    "index": first - 1,
                    "leaf": _b64(leaf),
                    "proof": [_b64(x) for x in proof],
                }
            )
        n = 0
        for idx, raw_leaf in conn.execution_options(stream_results=True, yield_per=2_000).execute(
            select(EVENTS.c.idx, EVENTS.c.leaf)
            .where(EVENTS.c.idx >= first, EVENTS.c.idx < size)
            .order_by(EVENTS.c.idx)
        ):
            if idx != first + n:
                raise ExportError(f"event #{first + n} is missing from the store; run `steward audit verify`")
            leaf = leaf_of(idx, bytes(raw_leaf))
            ev = StoredEvent.from_leaf(leaf)
            proof = merkle.inclusion_proof(idx, size, tree)
            emit(
                {
                    "type": "event",
                    "index": idx,
                    "leaf": _b64(leaf),
                    "event": ev.meta,
                    "proof": [_b64(x) for x in proof],
                }
            )
            n += 1
    end = {"type": "end", "first": first, "size": size, "events": n, "sha256": digest.hexdigest()}
    out.write(json.dumps(end, separators=(",", ":")) + "\n")
    return ExportSummary(n, size, origin, first)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        f = path.open("rb")
    except OSError as exc:
        raise ExportError(f"cannot read export {path}: {exc.strerror}") from None
    with f:
        yield from enumerate(f, 1)


@dataclass
class _Reading:
    """What `verify_export` has established so far, line by line."""

    path: Path
    header: dict[str, Any] | None = None
    since: datetime | None = None
    first: int = 0
    cp: Checkpoint | None = None
    boundary: bool = False
    n: int = 0  # events seen; the next must be #first + n


def verify_export(path: Path, verifier: Verifier) -> ExportSummary:
    """Check an export offline: signature, every leaf's proof, completeness. Raises ExportError.

    Complete means: every index from the header's `first` to the checkpoint's size - 1 exactly
    once and in order, the event before `first` older than `since`, the end record's range and
    count equal to what was read, and its digest equal to every byte before it."""
    digest = hashlib.sha256()
    r = _Reading(path)
    ended = False
    for no, raw in _lines(path):
        where = f"{path}:{no}"
        if ended:
            raise ExportError(f"{where}: data after the end record")
        if not raw.endswith(b"\n"):
            raise ExportError(f"{where}: last line is cut off (truncated export)")
        try:
            obj = json.loads(raw)
        except ValueError:
            raise ExportError(f"{where}: not JSON (corrupt or truncated export)") from None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if r.header is None:
            _read_header(r, obj, kind)
        elif kind == "checkpoint" and r.cp is None:
            try:
                r.cp = verifier.verify(str(obj.get("note", "")))
            except NoteError as exc:
                raise ExportError(f"{where}: {exc}") from None
            if r.cp.origin != r.header.get("origin"):
                raise ExportError(f"{where}: checkpoint origin differs from the header")
            if r.first > r.cp.size:
                raise ExportError(
                    f"{where}: the header's first index #{r.first} is beyond the checkpoint's "
                    f"size {r.cp.size}"
                )
        elif kind == "boundary":
            _read_boundary(r, obj, where)
        elif kind == "event":
            _read_event(r, obj, where)
        elif kind == "end":
            _read_end(r, obj, where, digest.hexdigest())
            ended = True
            continue
        else:
            raise ExportError(f"{where}: unexpected record {kind!r}")
        digest.update(raw)
    if r.header is None:
        raise ExportError(f"{path}: empty file, not an export")
    if r.cp is None:
        raise ExportError(f"{path}: no checkpoint (truncated export)")
    if not ended:
        raise ExportError(f"{path}: no end record (truncated export)")
    return ExportSummary(r.n, r.cp.size, r.cp.origin, r.first)


def _read_header(r: _Reading, obj: Any, kind: Any) -> None:
    path = r.path
    if kind != "header" or obj.get("format") != FORMAT:
        raise ExportError(f"{path}: not a Steward audit export (no header)")
    if obj.get("version") != VERSION:
        if obj.get("version") == 1:
            raise ExportError(
                f"{path}: export version 1 cannot prove that no event was left out; export again "
                "with this version of steward"
            )
        raise ExportError(f"{path}: export version {obj.get('version')!r} is not supported")
    first = obj.get("first")
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ExportError(f"{path}: header has no valid first index")
    try:
        r.since = parse_time(str(obj.get("since")))
    except EventError:
        raise ExportError(f"{path}: header has no valid since time") from None
    r.header, r.first = obj, first


def _read_boundary(r: _Reading, obj: dict[str, Any], where: str) -> None:
    if r.cp is None:
        raise ExportError(f"{where}: boundary record before the checkpoint")
    if r.boundary or r.n or r.first == 0:
        raise ExportError(f"{where}: unexpected boundary record")
    ev = _check_leaf(obj, r.cp.size, r.cp.root, where)
    if ev.index != r.first - 1:
        raise ExportError(
            f"{where}: boundary is event #{ev.index}, not #{r.first - 1} (the one before first)"
        )
    assert r.since is not None
    if ev.time >= r.since:
        raise ExportError(
            f"{where}: event #{ev.index}, before the export's first event, is not older than since "
            f"({format_time(ev.time)}): events at the start were left out"
        )
    r.boundary = True


def _require_boundary(r: _Reading, where: str) -> None:
    """An export that starts after event #0 must have shown, by its boundary record, that the event
    just before its first one is older than `since`: otherwise events at the start could be cut."""
    if r.first > 0 and not r.boundary:
        raise ExportError(
            f"{where}: no boundary record: cannot show that no event before #{r.first} was left out"
        )


def _read_event(r: _Reading, obj: dict[str, Any], where: str) -> None:
    if r.cp is None:
        raise ExportError(f"{where}: event before the checkpoint")
    _require_boundary(r, where)
    expected = r.first + r.n
    idx = obj.get("index")
    if isinstance(idx, int) and not isinstance(idx, bool) and idx != expected:
        if r.first <= idx < expected:
            raise ExportError(f"{where}: event #{idx} appears twice")
        if idx < r.first:
            raise ExportError(f"{where}: event #{idx} is before the export's first index #{r.first}")
        if idx >= r.cp.size:
            raise ExportError(f"{where}: event #{idx} is beyond the checkpoint's size {r.cp.size}")
        raise ExportError(
            f"{where}: event #{expected} is missing (next record is #{idx}; removed or out of order)"
        )
    ev = _check_leaf(obj, r.cp.size, r.cp.root, where)
    if ev.meta != obj.get("event"):
        raise ExportError(f"{where}: event #{ev.index} does not match its leaf")
    if r.n == 0:
        assert r.since is not None
        if ev.time < r.since:
            raise ExportError(
                f"{where}: the first event #{ev.index} is older than since: not where the export begins"
            )
    r.n += 1


def _read_end(r: _Reading, obj: dict[str, Any], where: str, digest: str) -> None:
    if r.cp is None:
        raise ExportError(f"{where}: end record before the checkpoint")
    _require_boundary(r, where)
    nxt = r.first + r.n
    if nxt < r.cp.size:
        missing = f"#{nxt}" if nxt == r.cp.size - 1 else f"#{nxt}..#{r.cp.size - 1}"
        raise ExportError(
            f"{where}: event(s) {missing} are missing: the checkpoint covers {r.cp.size} events"
        )
    if obj.get("first") != r.first or obj.get("size") != r.cp.size:
        raise ExportError(
            f"{where}: end record claims range first={obj.get('first')!r} size={obj.get('size')!r}, "
            f"the export holds #{r.first}..#{r.cp.size - 1} at size {r.cp.size}"
        )
    if obj.get("events") != r.n:
        raise ExportError(f"{where}: end record counts {obj.get('events')} events, found {r.n}")
    if obj.get("sha256") != digest:
        raise ExportError(f"{where}: content digest does not match (export was altered)")


def _check_leaf(obj: dict[str, Any], size: int, root: bytes, where: str) -> StoredEvent:
    try:
        idx = obj["index"]
        leaf = base64.b64decode(obj["leaf"], validate=True)
        proof = [base64.b64decode(p, validate=True) for p in obj["proof"]]
    except (KeyError, TypeError, binascii.Error):
        raise ExportError(f"{where}: malformed event record") from None
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise ExportError(f"{where}: malformed event index")
    try:
        ev = StoredEvent.from_leaf(leaf)
    except EventError as exc:
        raise ExportError(f"{where}: {exc}") from None
    if ev.index != idx:
        raise ExportError(f"{where}: event #{idx} does not match its leaf")
    try:
        merkle.verify_inclusion(idx, size, merkle.leaf_hash(leaf), proof, root)
    except ProofError as exc:
        raise ExportError(f"{where}: event #{idx}: {exc}") from None
    return ev
