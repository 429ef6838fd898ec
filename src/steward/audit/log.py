"""The audit log: append events as Merkle leaves, sign checkpoints, serve proofs and payloads.

Sequencing. Every append transaction first locks the single `merkle_state` row (SQLite: the BEGIN
IMMEDIATE write lock the engine takes; PostgreSQL: `SELECT ... FOR UPDATE`), reads the tree size and
compact range, assigns the next indexes, inserts leaves and the newly completed cached nodes, and
writes the new size and frontier back. Whoever holds the row is the log's only writer, so any number
of workers or replicas share one log without forking it, and `audit_events.idx` as primary key makes
a fork impossible even if that reasoning were wrong.

Group commit. One transaction per request would cap throughput at the disk's commit rate;
`GroupCommitter` collects events from many requests on a background thread and commits them
together, resolving each caller's future only after the commit, so a response is never sent for an
event that is not durable.

Proofs. Perfect subtrees at level >= CACHE_LEVEL are cached in `merkle_nodes` as they complete
(about n/8 rows); anything below comes from at most 16 leaf hashes, so one proof reads a few rows
whatever the tree size.

Acts on the log itself are recorded in it (`record_act`): erasing a data subject (one event per
tenant that lost keys, naming the subject by the same pseudonym its own events carry), payload
expiry, data-key rotation and KEK re-wrapping. Acts that concern no one tenant are filed under
OPERATOR_TENANT, which no API key can belong to (tenant ids starting with `_` are reserved).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from steward.audit import merkle
from steward.audit.crypto import (
    DecryptionError,
    KeyFileError,
    KeyProvider,
    LocalKeyProvider,
    kek_id_of,
    seal,
    unseal,
)
from steward.audit.events import (
    JSON,
    AuditEvent,
    Principal,
    StoredEvent,
    canonical_json,
    encode_leaf,
    payload_aad,
    time_us,
)
from steward.audit.keyring import KeyRing, Scrub, wrap_aad
from steward.audit.merkle import CompactRange, ProofError, Subtree
from steward.audit.note import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    Checkpoint,
    Signer,
    SigningKeyError,
    Verifier,
    load_or_create_signer,
)
from steward.audit.schema import CHECKPOINTS, DATA_KEYS, EVENTS, NODE_LEVEL_SHIFT, NODES, STATE
from steward.store.db import begin_immediate, reading

CACHE_LEVEL = 4
EVENT_COLUMNS = (
    "idx", "event_id", "time_us", "tenant", "kind", "request_id", "subject_ref", "outcome", "status",
    "leaf", "leaf_hash",
)  # fmt: skip
KEK_FILE = "audit-kek.json"
OPERATOR_TENANT = "_operator"  # acts on the whole log (export, checkpoint, KEK re-wrap)
_log = logging.getLogger(__name__)


class AuditError(RuntimeError):
    """The log cannot do what was asked (closed, unsigned, missing state)."""


def node_id(level: int, index: int) -> int:
    return (level << NODE_LEVEL_SHIFT) | index


def split_node_id(nid: int) -> Subtree:
    return nid >> NODE_LEVEL_SHIFT, nid & ((1 << NODE_LEVEL_SHIFT) - 1)


@dataclass(frozen=True)
class Receipt:
    """Proof of durability handed to the caller: the event is committed at `index`."""

    index: int
    event_id: str
    leaf_hash: bytes


@dataclass(frozen=True)
class InclusionProof:
    index: int
    tree_size: int
    leaf_hash: bytes
    proof: list[bytes]
    checkpoint: str  # the signed note whose root the proof leads to

    def to_json(self) -> dict[str, Any]:
        import base64

        return {
            "index": self.index,
            "tree_size": self.tree_size,
            "leaf_hash": base64.b64encode(self.leaf_hash).decode(),
            "proof": [base64.b64encode(p).decode() for p in self.proof],
            "checkpoint": self.checkpoint,
        }


@dataclass(frozen=True)
class Erasure:
    """What `AuditLog.erase` did: keys destroyed per tenant, the events recording it, and
    whether the destroyed keys' bytes are gone from the store's files (`scrub.message` says)."""

    destroyed: dict[str, int]
    receipts: list[Receipt]
    scrub: Scrub

    @property
    def count(self) -> int:
        return sum(self.destroyed.values())


def os_user() -> str:
    """Who runs a CLI act, as the OS knows them (never fails: a uid without a passwd entry is fine)."""
    import getpass
    import os

    try:
        return getpass.getuser()
    except Exception:  # KeyError/OSError: no passwd entry and no LOGNAME/USER
        return f"uid:{os.getuid()}"


@dataclass(frozen=True)
class _AppendSQL:
    """The append transaction's statements in the driver's parameter style (always parameterised)."""

    sqlite: bool  # SQLite: BEGIN IMMEDIATE takes the write lock up front; psycopg opens a transaction
    lock_state: str
    insert_event: str
    insert_node: str
    update_state: str

    @classmethod
    def for_engine(cls, engine: Engine) -> _AppendSQL:
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        sqlite = engine.dialect.name == "sqlite"
        cols = list(EVENTS.c.keys())
        if tuple(cols) != EVENT_COLUMNS:  # rows are built positionally in append_many
            raise AuditError(f"audit_events columns {cols} differ from {EVENT_COLUMNS}")
        state = STATE.name
        return cls(
            sqlite=sqlite,
            lock_state=f"SELECT size, frontier FROM {state} WHERE id = 1" + ("" if sqlite else " FOR UPDATE"),
            insert_event=(
                f"INSERT INTO {EVENTS.name} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})"
            ),
            insert_node=f"INSERT INTO {NODES.name} (id, hash) VALUES ({mark}, {mark})",
            update_state=f"UPDATE {state} SET size = {mark}, frontier = {mark} WHERE id = 1",
        )


@dataclass(frozen=True)
class _Prepared:
    event: AuditEvent
    subject_ref: str | None
    data_key: str | None
    ciphertext: bytes


class StoreNodes:
    """NodeSource over the store: cached nodes by id, lower levels from leaf hashes, one query each."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def subtree_hashes(self, subtrees: Iterable[Subtree]) -> dict[Subtree, bytes]:
        subtrees = list(subtrees)
        cached = [s for s in subtrees if s[0] >= CACHE_LEVEL]
        low = [s for s in subtrees if s[0] < CACHE_LEVEL]
        out: dict[Subtree, bytes] = {}
        if cached:
            rows = self.conn.execute(
                select(NODES.c.id, NODES.c.hash).where(NODES.c.id.in_([node_id(*s) for s in cached]))
            )
            for nid, h in rows:
                out[split_node_id(nid)] = bytes(h)
        if low:
            wanted = sorted({i for lvl, idx in low for i in range(idx << lvl, (idx + 1) << lvl)})
            rows = self.conn.execute(select(EVENTS.c.idx, EVENTS.c.leaf_hash).where(EVENTS.c.idx.in_(wanted)))
            leaves = {i: bytes(h) for i, h in rows}
            for lvl, idx in low:
                try:
                    hs = [leaves[i] for i in range(idx << lvl, (idx + 1) << lvl)]
                except KeyError as exc:
                    raise AuditError(f"event #{exc.args[0]} is missing from the store") from None
                while len(hs) > 1:
                    hs = [merkle.node_hash(hs[i], hs[i + 1]) for i in range(0, len(hs), 2)]
                out[(lvl, idx)] = hs[0]
        missing = [s for s in subtrees if s not in out]
        if missing:
            raise AuditError(f"cached Merkle node {missing[0]} is missing; run `steward audit verify`")
        return out


IDENTITY_ROW = 2  # the merkle_state row naming the KEK and the checkpoint signer of this store
_KEK_CHECK_AAD = b"steward-audit-kek-check"


def _identity_json(kek_id: str, kek_check: bytes, signer: Signer) -> bytes:
    doc = {
        "kek_id": kek_id,
        "kek_check": base64.b64encode(kek_check).decode(),
        "signer": signer.verifier.vkey(),
    }
    return canonical_json(doc)


def _kek_check(provider: KeyProvider) -> bytes:
    """A random key wrapped by the current KEK: unwrapping it later proves a provider holds that KEK."""
    return provider.wrap(os.urandom(32), _KEK_CHECK_AAD)


def _parse_identity(blob: Any) -> dict[str, Any] | None:
    if blob is None:
        return None
    try:
        doc = json.loads(bytes(blob))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise AuditError(
            f"merkle_state row {IDENTITY_ROW} (the store's key identity) is malformed: {exc}"
        ) from None
    return doc


def _lock_identity(conn: Connection) -> dict[str, Any] | None:
    """Take the append lock (SQLite: the engine's BEGIN IMMEDIATE; PostgreSQL: the sequencer row
    FOR UPDATE) and read the store's key identity, None if none was recorded yet."""
    if conn.dialect.name != "sqlite":
        conn.execute(select(STATE.c.id).where(STATE.c.id == 1).with_for_update()).first()
    return _parse_identity(conn.execute(select(STATE.c.frontier).where(STATE.c.id == IDENTITY_ROW)).scalar())


def _read_identity(engine: Engine) -> dict[str, Any] | None:
    """The store's key identity without any lock and without writing (read-only commands).

    On SQLite every transaction the engine begins is a BEGIN IMMEDIATE (the write lock), so the row
    is read on the driver's connection outside any transaction (autocommit: a plain read snapshot).
    PostgreSQL: a plain SELECT, no FOR UPDATE."""
    if engine.dialect.name == "sqlite":
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(f"SELECT frontier FROM {STATE.name} WHERE id = ?", (IDENTITY_ROW,))
            row = cur.fetchone()
            cur.close()
        finally:
            raw.close()
        return _parse_identity(row[0] if row is not None else None)
    with reading(engine).connect() as conn:
        return _parse_identity(
            conn.execute(select(STATE.c.frontier).where(STATE.c.id == IDENTITY_ROW)).scalar()
        )


def _copy_hint(keys_dir: Path, *, kek: bool = True) -> str:
    files = f"{KEK_FILE} and {PRIVATE_NAME} (keep them" if kek else f"{PRIVATE_NAME} (keep it"
    return (
        f"copy {files} mode 0600) and {PUBLIC_NAME} from the keys "
        f"directory ($STEWARD_DATA_DIR/keys) of the first Steward process that opened this store into "
        f"{keys_dir}; every replica sharing one store needs the same keys"
    )


def _merge_hint(kek_path: Path, source: str, current: str | None) -> str:
    """What to do when a replica's own KEK file lacks a KEK the store needs. Never "replace the
    file": a replica that ran before identities were recorded may have wrapped data keys with its
    own KEK, and overwriting its file would make those payloads unreadable for good."""
    cur = f', set "current" to {current!r}' if current else ""
    return (
        f'merge the KEK files, do not replace this one: add the entries under "keys" in {KEK_FILE} '
        f'of {source} to the "keys" of {kek_path}, keeping all of its own entries (data keys may '
        f"be wrapped by them){cur} and keep it mode 0600; then give the merged file to every replica "
        "sharing this store (each must hold every KEK its data keys are wrapped by)"
    )


def _check_identity(
    ident: dict[str, Any],
    keys_dir: Path,
    provider: KeyProvider | None,
    origin: str | None,
) -> tuple[Signer, KeyProvider]:
    """The keys of a store that names its own: they must be the recorded ones; nothing is created."""
    kek_path = keys_dir / KEK_FILE
    kek_id = str(ident.get("kek_id"))
    if provider is None:
        if not kek_path.exists():
            raise KeyFileError(
                f"key file {kek_path} is missing, and this store's data keys are wrapped by KEK "
                f"{kek_id!r}: {_copy_hint(keys_dir)}"
            )
        provider = LocalKeyProvider(kek_path)
    try:
        provider.unwrap(base64.b64decode(str(ident.get("kek_check"))), _KEK_CHECK_AAD)
    except (DecryptionError, ValueError) as exc:
        if isinstance(provider, LocalKeyProvider):
            hint = _merge_hint(
                kek_path,
                "the first Steward process that opened this store ($STEWARD_DATA_DIR/keys there)",
                kek_id,
            )
            where: Path | str = kek_path
        else:
            hint, where = "configure the key provider with that KEK", "the key provider"
        raise KeyFileError(
            f"this store's data keys are wrapped by KEK {kek_id!r}, which {where} does not hold "
            f"({exc}); a second KEK would make payloads unreadable across replicas: {hint}"
        ) from None
    recorded = Verifier.parse(str(ident.get("signer")))
    if origin is not None and origin != recorded.name:
        raise SigningKeyError(
            f"this store's checkpoints carry origin {recorded.name!r}, not {origin!r}: start every "
            "replica with the same origin"
        )
    priv = keys_dir / PRIVATE_NAME
    if not priv.exists():
        raise SigningKeyError(
            f"checkpoint signing key {priv} is missing, and this store's checkpoints are signed by "
            f"{recorded.name} ({recorded.key_hash.hex()}): {_copy_hint(keys_dir, kek=False)}"
        )
    signer = load_or_create_signer(keys_dir, recorded.name, create=False)
    if signer.verifier.raw != recorded.raw:
        raise SigningKeyError(
            f"checkpoint signing key {priv} is not the key this store's checkpoints are signed by "
            f"({recorded.name}, key hash {recorded.key_hash.hex()}): {_copy_hint(keys_dir, kek=False)}"
        )
    return signer, provider


class _NoKEK:
    """The KEK of a read-only open that found no key file on a store that records no identity:
    proofs need no keys, so the open proceeds (creating nothing); any use of a key refuses."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _refuse(self) -> KeyFileError:
        return KeyFileError(f"key file {self.path} is missing; encrypted payloads cannot be read")

    @property
    def current_kek_id(self) -> str:
        raise self._refuse()

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        raise self._refuse()

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        raise self._refuse()


def _bind_keys(
    engine: Engine,
    keys_dir: Path,
    provider: KeyProvider | None,
    origin: str | None,
    create_signer: bool,
    read_only: bool = False,
) -> tuple[Signer, KeyProvider]:
    """The KEK provider and checkpoint signer this store belongs to.

    On a brand-new store (no identity recorded yet) the keys are loaded or created as before and their
    identity (KEK id plus a key wrapped by it, the signer's public key and origin) is written to the
    store under the append lock, so replicas starting together cannot each record their own. On a
    store that names its keys, nothing is ever created: a KEK that cannot unwrap the recorded check,
    or a signing key or origin other than the recorded one, refuses to start, naming what to do.

    `read_only` (the CLI's `proof`, `consistency`): the identity is read without the append lock and
    never written; recorded keys are checked the same way, and a store that records none is opened
    with the keys as they are (nothing created, nothing checked: proofs use no keys).
    """
    kek_path = keys_dir / KEK_FILE
    if read_only:
        ident = _read_identity(engine)
        if ident is not None:
            return _check_identity(ident, keys_dir, provider, origin)
        if provider is None:
            provider = LocalKeyProvider(kek_path) if kek_path.exists() else _NoKEK(kek_path)
        return load_or_create_signer(keys_dir, origin, create=False), provider
    with engine.begin() as conn:
        ident = _lock_identity(conn)
        if ident is None:
            if provider is None:
                existing = conn.execute(select(func.count()).select_from(DATA_KEYS)).scalar_one()
                provider = LocalKeyProvider(kek_path, create=existing == 0)
            _check_existing_keys(conn, provider, kek_path)
            signer = load_or_create_signer(keys_dir, origin, create=create_signer)
            frontier = _identity_json(provider.current_kek_id, _kek_check(provider), signer)
            conn.execute(insert(STATE).values(id=IDENTITY_ROW, size=0, frontier=frontier))
            return signer, provider
    return _check_identity(ident, keys_dir, provider, origin)


def _check_existing_keys(conn: Connection, provider: KeyProvider, kek_path: Path) -> None:
    """A store from before identities were recorded: every KEK its live data keys are wrapped by must
    be held (replicas then could each have created their own). One data key per KEK id is unwrapped
    (one query); the refusal names every KEK id that is missing."""
    k = DATA_KEYS.c
    one_per_kek = select(func.min(k.id)).where(k.wrapped.is_not(None)).group_by(k.kek_id)
    rows = conn.execute(
        select(k.id, k.tenant, k.subject_ref, k.purpose, k.wrapped).where(k.id.in_(one_per_kek))
    ).all()
    missing: list[str] = []
    for row in rows:
        wrapped = bytes(row.wrapped)
        try:
            provider.unwrap(wrapped, wrap_aad(row.id, row.tenant, row.subject_ref, row.purpose))
        except DecryptionError:
            try:
                missing.append(kek_id_of(wrapped))
            except DecryptionError:
                missing.append(f"(data key {row.id}: unknown wrap format)")
    if not missing:
        return
    names = ", ".join(repr(m) for m in sorted(set(missing)))
    if isinstance(provider, LocalKeyProvider):
        where: Path | str = kek_path
        hint = _merge_hint(
            kek_path,
            "every Steward process that has written to this store ($STEWARD_DATA_DIR/keys there)",
            None,
        )
    else:
        where, hint = "the key provider", "configure the key provider with those KEKs"
    raise KeyFileError(
        f"this store's data keys are wrapped by KEK(s) {names}, which {where} does not hold: {hint}"
    )


def _record_kek(engine: Engine, provider: KeyProvider) -> None:
    """After a re-wrap the store belongs to the current KEK: record it (old KEKs may be retired)."""
    with engine.begin() as conn:
        ident = _lock_identity(conn)
        if ident is None:
            return
        ident["kek_id"] = provider.current_kek_id
        ident["kek_check"] = base64.b64encode(_kek_check(provider)).decode()
        conn.execute(update(STATE).where(STATE.c.id == IDENTITY_ROW).values(frontier=canonical_json(ident)))


class AuditLog:
    """The log over one store. Thread-safe; one instance per process is enough."""

    def __init__(
        self,
        engine: Engine,
        *,
        signer: Signer | None,
        keys: KeyRing,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 10.0,
    ) -> None:
        self.engine = engine
        self.signer = signer
        self.keys = keys
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self._sql = _AppendSQL.for_engine(engine)
        self._lock = threading.Lock()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._closed = False

    @classmethod
    def open(
        cls,
        engine: Engine,
        keys_dir: Path,
        *,
        provider: KeyProvider | None = None,
        origin: str | None = None,
        create_signing_key: bool = True,
        read_only: bool = False,
        **kwargs: Any,
    ) -> AuditLog:
        """The log with keys from `keys_dir` (`$STEWARD_DATA_DIR/keys`).

        The local KEK file is created only while the store holds no data keys: a missing key file in
        front of existing wrapped keys means payloads would be unreadable, and we refuse to start
        rather than quietly begin a second, disjoint key hierarchy.

        The store names the KEK and the checkpoint signing key it belongs to (`_bind_keys`): the
        first process to open a brand-new store creates (or brings) both and records them; every
        later one, on any host, must hold the same ones or refuses to start, saying what to copy.

        `read_only`: for reading only (proofs): the identity is read without the append lock and
        never recorded, and no key is created; recorded keys are still checked.
        """
        signer, provider = _bind_keys(engine, keys_dir, provider, origin, create_signing_key, read_only)
        key_args = {k: kwargs.pop(k) for k in ("key_period_s", "cache_ttl_s", "scrub_wait_s") if k in kwargs}
        return cls(engine, signer=signer, keys=KeyRing(engine, provider, **key_args), **kwargs)

    @property
    def origin(self) -> str | None:
        return self.signer.name if self.signer else None

    # --- appending ----------------------------------------------------------------------------------

    def _prepare(self, event: AuditEvent) -> _Prepared:
        tenant = event.tenant
        ref = self.keys.subject_ref(tenant, event.subject) if event.subject is not None else None
        if event.payload is None:
            return _Prepared(event, ref, None, b"")
        key_id, key = self.keys.payload_key(tenant, ref)
        ct = seal(key, canonical_json(dict(event.payload)), payload_aad(event.event_id, tenant))
        return _Prepared(event, ref, key_id, ct)

    def append(self, event: AuditEvent) -> Receipt:
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[AuditEvent]) -> list[Receipt]:
        """Commit `events` as consecutive leaves in one transaction; returns after the commit."""
        if self._closed:
            raise AuditError("audit log is closed")
        if not events:
            return []
        prepared = [self._prepare(e) for e in events]  # encryption and key lookups outside the lock
        receipts: list[Receipt] = []
        rows: list[tuple[Any, ...]] = []
        nodes: list[tuple[int, bytes]] = []

        def keep(level: int, index: int, h: bytes) -> None:
            if level >= CACHE_LEVEL:
                nodes.append((node_id(level, index), h))

        # The hot path runs on the driver's connection with prepared statement text: SQLAlchemy's
        # per-statement execution machinery cost more than the five statements themselves, on the
        # group-commit thread that competes with request handling for the GIL.
        sql = self._sql
        raw = self.engine.raw_connection()
        try:
            if sql.sqlite:
                begin_immediate(raw.driver_connection)
            cur = raw.cursor()
            cur.execute(sql.lock_state)
            state = cur.fetchone()
            if state is None:
                raise AuditError("the audit log's merkle_state row is missing (run the migrations)")
            size, blob = state
            compact = CompactRange.unpack(size, bytes(blob))
            for p in prepared:
                idx = compact.size
                ev = p.event
                leaf = encode_leaf(ev.metadata(idx, p.subject_ref, p.data_key), p.ciphertext)
                h = merkle.leaf_hash(leaf)
                compact.append(h, keep)
                rows.append(
                    (
                        idx,
                        ev.event_id,
                        time_us(ev.time),
                        ev.tenant,
                        ev.kind,
                        ev.request_id,
                        p.subject_ref,
                        ev.outcome,
                        ev.status,
                        leaf,
                        h,
                    )
                )
                receipts.append(Receipt(idx, ev.event_id, h))
            cur.executemany(sql.insert_event, rows)
            if nodes:
                cur.executemany(sql.insert_node, nodes)
            cur.execute(sql.update_state, (compact.size, compact.pack()))
            cur.close()
            raw.commit()  # sqlite3 commits the BEGIN IMMEDIATE it did not open itself, too
        except BaseException as exc:
            try:
                raw.rollback()
            except Exception:
                _log.debug("rollback of a failed audit append failed", exc_info=True)
            if isinstance(exc, self.engine.dialect.loaded_dbapi.IntegrityError):
                stored = self._already_stored(prepared)
                if stored is not None:  # a retry of events that are in the log: they are committed
                    return stored
            raise
        finally:
            raw.close()  # back to the pool
        self._after_append(len(events))
        return receipts

    def _already_stored(self, prepared: Sequence[_Prepared]) -> list[Receipt] | None:
        """Receipts for `prepared` if every one of them is already in the log as that same event
        (an append retried after its commit succeeded, e.g. the connection dropped during COMMIT);
        None if any is missing or a stored row with its event id is a different event."""
        ids = [p.event.event_id for p in prepared]
        c = EVENTS.c
        try:
            with reading(self.engine).connect() as conn:
                rows = {
                    r.event_id: r
                    for r in conn.execute(
                        select(
                            c.idx, c.event_id, c.time_us, c.tenant, c.kind, c.request_id,
                            c.subject_ref, c.outcome, c.status, c.leaf_hash,
                        ).where(c.event_id.in_(ids))
                    )
                }  # fmt: skip
        except Exception:
            _log.debug("could not look up the events of a failed audit append", exc_info=True)
            return None
        out: list[Receipt] = []
        for p in prepared:
            ev, row = p.event, rows.get(p.event.event_id)
            if row is None or (
                row.time_us,
                row.tenant,
                row.kind,
                row.request_id,
                row.subject_ref,
                row.outcome,
                row.status,
            ) != (time_us(ev.time), ev.tenant, ev.kind, ev.request_id, p.subject_ref, ev.outcome, ev.status):
                return None
            out.append(Receipt(int(row.idx), ev.event_id, bytes(row.leaf_hash)))
        return out

    def _after_append(self, n: int) -> None:
        """Sign a checkpoint when one is due. The events are committed whatever happens here: a
        failed checkpoint is logged and retried by the next periodic or count-driven one."""
        with self._lock:
            self._since_checkpoint += n
            due = self._since_checkpoint >= self.checkpoint_every
        try:
            if due:
                self.checkpoint()
            else:
                self.maybe_checkpoint()
        except Exception:
            _log.exception("audit checkpoint after a committed append failed; retried later")

    # --- checkpoints --------------------------------------------------------------------------------

    def maybe_checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint if `checkpoint_interval_s` passed since the last one and events came."""
        with self._lock:
            due = self._since_checkpoint > 0 and (
                time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s
            )
        return self.checkpoint() if due else None

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current tree head now (no-op when nothing was added since the last checkpoint)."""
        if self.signer is None:
            raise AuditError("no checkpoint signing key loaded")
        with self._lock:
            pending = self._since_checkpoint
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
        try:
            return self._sign_checkpoint(self.signer)
        except BaseException:
            with self._lock:  # still unsigned: the periodic checkpoint retries after its interval
                self._since_checkpoint += max(pending, 1)
            raise

    def _sign_checkpoint(self, signer: Signer) -> Checkpoint | None:
        with self.engine.begin() as conn:
            size, blob = conn.execute(
                select(STATE.c.size, STATE.c.frontier).where(STATE.c.id == 1).with_for_update()
            ).one()
            last = conn.execute(select(func.max(CHECKPOINTS.c.size))).scalar()
            if size == 0 or (last is not None and last >= size):
                return None
            cp = Checkpoint(signer.name, size, CompactRange.unpack(size, bytes(blob)).root())
            note = signer.sign(cp)
            conn.execute(
                insert(CHECKPOINTS).values(
                    size=size, root_hash=cp.root, created_us=time.time_ns() // 1000, note=note
                )
            )
        return Checkpoint(cp.origin, cp.size, cp.root, note)

    def latest_checkpoint(self) -> Checkpoint | None:
        with reading(self.engine).connect() as conn:
            row = conn.execute(
                select(CHECKPOINTS.c.size, CHECKPOINTS.c.root_hash, CHECKPOINTS.c.note)
                .order_by(CHECKPOINTS.c.size.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        return Checkpoint(self.origin or "", row[0], bytes(row[1]), row[2])

    def _checkpoint_at(self, conn: Connection, size: int | None) -> tuple[int, str]:
        stmt = select(CHECKPOINTS.c.size, CHECKPOINTS.c.note)
        stmt = (
            stmt.order_by(CHECKPOINTS.c.size.desc()).limit(1)
            if size is None
            else stmt.where(CHECKPOINTS.c.size == size)
        )
        row = conn.execute(stmt).first()
        if row is None:
            raise ProofError("no signed checkpoint yet" if size is None else f"no checkpoint at size {size}")
        return int(row[0]), str(row[1])

    def size(self) -> int:
        with reading(self.engine).connect() as conn:
            return int(conn.execute(select(STATE.c.size).where(STATE.c.id == 1)).scalar_one())

    # --- proofs -------------------------------------------------------------------------------------

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> InclusionProof:
        """Proof that leaf `index` is in the checkpoint of `tree_size` (default: the latest one)."""
        with reading(self.engine).connect() as conn:
            size, note = self._checkpoint_at(conn, tree_size)
            if not 0 <= index < size:
                raise ProofError(f"event #{index} is not covered by the checkpoint of size {size}")
            src = StoreNodes(conn)
            proof = merkle.inclusion_proof(index, size, src)
            leaf = src.subtree_hashes([(0, index)])[(0, index)]
        return InclusionProof(index, size, leaf, proof, note)

    def inclusion_proof_for(self, event_id: str, tree_size: int | None = None) -> InclusionProof:
        return self.inclusion_proof(self._index_of(event_id), tree_size)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        with reading(self.engine).connect() as conn:
            n = int(conn.execute(select(STATE.c.size).where(STATE.c.id == 1)).scalar_one())
            if size2 > n:
                raise ProofError(f"the log has only {n} events")
            return merkle.consistency_proof(size1, size2, StoreNodes(conn))

    # --- reading ------------------------------------------------------------------------------------

    def _index_of(self, event_id: str) -> int:
        with reading(self.engine).connect() as conn:
            idx = conn.execute(select(EVENTS.c.idx).where(EVENTS.c.event_id == event_id)).scalar()
        if idx is None:
            raise LookupError(f"no audit event {event_id}")
        return int(idx)

    def get_event(self, ref: int | str, *, tenant: str | None = None) -> StoredEvent:
        """An event by index or event id; with `tenant`, another tenant's event is 'not found'."""
        cond = EVENTS.c.idx == ref if isinstance(ref, int) else EVENTS.c.event_id == ref
        with reading(self.engine).connect() as conn:
            leaf = conn.execute(select(EVENTS.c.leaf).where(cond)).scalar()
        if leaf is None:
            raise LookupError(f"no audit event {ref}")
        ev = StoredEvent.from_leaf(bytes(leaf))
        if tenant is not None and ev.tenant != tenant:
            raise LookupError(f"no audit event {ref}")
        return ev

    def list_events(
        self, *, tenant: str | None = None, since_us: int | None = None, after: int = -1, limit: int = 100
    ) -> list[StoredEvent]:
        stmt = select(EVENTS.c.leaf).where(EVENTS.c.idx > after).order_by(EVENTS.c.idx).limit(limit)
        if tenant is not None:
            stmt = stmt.where(EVENTS.c.tenant == tenant)
        if since_us is not None:
            stmt = stmt.where(EVENTS.c.time_us >= since_us)
        with reading(self.engine).connect() as conn:
            return [StoredEvent.from_leaf(bytes(r[0])) for r in conn.execute(stmt)]

    def read_payload(
        self, event: StoredEvent | int | str, *, tenant: str | None = None
    ) -> dict[str, Any] | None:
        """The decrypted payload, None if the event had none; PayloadUnavailable once its key is gone.

        Access control (auditor role) and logging the read as an event are the caller's job.
        """
        ev = event if isinstance(event, StoredEvent) else self.get_event(event, tenant=tenant)
        if tenant is not None and ev.tenant != tenant:
            raise LookupError(f"no audit event {ev.event_id}")
        key_id = ev.data_key
        if key_id is None:
            return None
        key = self.keys.key_by_id(key_id)
        data: dict[str, Any] = json.loads(unseal(key, ev.ciphertext, payload_aad(ev.event_id, ev.tenant)))
        return data

    # --- acts on the log ----------------------------------------------------------------------------

    def record_act(
        self,
        action: str,
        *,
        tenant: str | None = None,
        role: str = "system",
        outcome: str = "ok",
        subject: str | None = None,
        detail: dict[str, JSON] | None = None,
        route: str | None = None,
    ) -> Receipt:
        """Append an admin event for an act on the log or its keys (not a request through the API).

        `tenant`: the tenant the act concerns (default OPERATOR_TENANT); `role`: "cli" for a person
        at the command line (name them in `detail["os_user"]`), "system" for the gateway itself.
        `subject` is pseudonymised like every event's, never stored in clear."""
        return self.append(
            AuditEvent(
                kind="admin",
                principal=Principal(tenant=tenant or OPERATOR_TENANT, role=role),
                outcome=outcome,
                route=route or f"{role} {action}",
                subject=subject,
                detail={"action": action, **(detail or {})},
            )
        )

    # --- keys ---------------------------------------------------------------------------------------

    def erase_subject(
        self,
        subject: str,
        tenant: str | None = None,
        *,
        role: str = "system",
        detail: dict[str, JSON] | None = None,
    ) -> int:
        """Crypto-shred a data subject: destroy their payload keys, record it, scrub the old bytes.

        Leaves (and `verify`) are untouched. Returns the number of keys destroyed; `erase` says more."""
        return self.erase(subject, tenant, role=role, detail=detail).count

    def erase(
        self,
        subject: str,
        tenant: str | None = None,
        *,
        role: str = "system",
        detail: dict[str, JSON] | None = None,
    ) -> Erasure:
        """Destroy the subject's payload keys (in `tenant`, or every tenant), then record the erasure
        in the log (one event per tenant that lost keys, or one saying nothing was found), then scrub
        the destroyed keys' bytes from the store's files. If the record cannot be committed this
        raises AuditError: the keys are gone all the same, and the operator must know it is unrecorded.
        """
        destroyed = self.keys.erase_subject_by_tenant(subject, tenant)
        scope = tenant if tenant is not None else "*"
        hit = {t: n for t, n in destroyed.items() if n}
        # Nothing found in any tenant: one record, without a subject (no tenant's pseudonym applies).
        targets: list[tuple[str | None, int]] = list(hit.items()) or [(tenant, 0)]
        receipts: list[Receipt] = []
        try:
            for t, n in targets:
                receipts.append(
                    self.record_act(
                        "subject.erase",
                        tenant=t,
                        role=role,
                        subject=subject if t is not None else None,
                        detail={**(detail or {}), "keys_destroyed": n, "scope": scope},
                        route=f"{role} audit erase",
                    )
                )
        except Exception as exc:
            raise AuditError(
                f"destroyed {sum(destroyed.values())} data key(s) but could not record the erasure "
                f"in the audit log ({exc}); record it by hand"
            ) from exc
        return Erasure(destroyed, receipts, self.keys.scrub())

    def rotate_data_keys(self, tenant: str | None = None, *, role: str = "system") -> int:
        """Retire the current payload keys (new payloads get fresh ones); recorded as an event."""
        n = self.keys.rotate(tenant)
        self.record_act("key.rotate", tenant=tenant, role=role, detail={"keys_retired": n})
        return n

    def expire_payloads(self, retention_s: float) -> int:
        """Destroy the keys of payloads past retention; each tenant that lost keys gets an event."""
        destroyed = self.keys.expire_by_tenant(retention_s)
        for t, n in sorted(destroyed.items()):
            self.record_act(
                "payload.expire",
                tenant=t,
                detail={"keys_destroyed": n, "retention_s": float(retention_s)},
            )
        if destroyed:
            self.keys.scrub()  # logs a warning itself when readers keep the WAL busy
        return sum(destroyed.values())

    def rewrap_data_keys(self, *, role: str = "system") -> int:
        """Re-wrap every live data key under the current KEK (after rotating it); recorded."""
        n = self.keys.rewrap()
        _record_kek(self.engine, self.keys.provider)
        self.record_act(
            "kek.rewrap", role=role, detail={"keys_rewrapped": n, "kek_id": self.keys.provider.current_kek_id}
        )
        self.keys.scrub()  # the old wrapped forms, under the old KEK, leave the WAL too
        return n

    def close(self) -> None:
        """Sign a final checkpoint (call on SIGTERM / shutdown)."""
        if self._closed:
            return
        if self.signer is not None:
            self.checkpoint()
        self._closed = True


_Waiter = Future[Receipt] | tuple[asyncio.AbstractEventLoop, asyncio.Future[Receipt]]


def _deliver(outcomes: list[tuple[asyncio.Future[Receipt], Receipt | BaseException]]) -> None:
    """On the waiters' event loop: hand each caller its receipt (or the error)."""
    for fut, out in outcomes:
        if fut.done():  # the caller stopped waiting; its event is committed all the same
            continue
        if isinstance(out, BaseException):
            fut.set_exception(out)
        else:
            fut.set_result(out)


class GroupCommitter:
    """Batches events from many callers into one transaction on a background thread.

    `submit()` returns a future resolved with the Receipt once the batch is committed (or with the
    exception if it failed); `await committer.append(event)` is the asyncio form. The thread also
    signs checkpoints when `checkpoint_interval_s` elapses with events pending, so a quiet log still
    gets its tail signed.

    An event is committed even if its caller stops waiting (a cancelled request): the record of an
    answer that was abandoned half-way is still a record. Async callers on one event loop are woken
    with one cross-thread call per batch, not one per event (each is a self-pipe write and an extra
    turn of the loop on the request path).
    """

    def __init__(self, log: AuditLog, *, max_batch: int = 1000, max_wait_s: float = 0.002) -> None:
        self.log = log
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._q: queue.SimpleQueue[tuple[AuditEvent, _Waiter] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-group-commit", daemon=True)
        self._thread.start()

    def submit(self, event: AuditEvent) -> Future[Receipt]:
        if self._closed:
            raise AuditError("audit committer is closed")
        fut: Future[Receipt] = Future()
        self._q.put((event, fut))
        return fut

    async def append(self, event: AuditEvent) -> Receipt:
        if self._closed:
            raise AuditError("audit committer is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Receipt] = loop.create_future()
        self._q.put((event, (loop, fut)))
        return await fut

    def _batches(self) -> Iterator[list[tuple[AuditEvent, _Waiter]] | None]:
        tick = max(0.05, min(1.0, self.log.checkpoint_interval_s / 4))
        while True:
            try:
                first = self._q.get(timeout=tick)
            except queue.Empty:
                yield []
                continue
            if first is None:
                yield None
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = (
                        self._q.get_nowait()
                        if not self._q.empty()
                        else self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                    )
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            yield batch
            if stop:
                yield None
                return

    def _run(self) -> None:
        for batch in self._batches():
            if batch is None:
                return
            if batch:
                self._commit(batch)
            try:
                self.log.maybe_checkpoint()
            except Exception:  # a failed periodic checkpoint is retried on the next tick
                _log.exception("periodic audit checkpoint failed")

    def _commit(self, batch: list[tuple[AuditEvent, _Waiter]]) -> None:
        outcomes: list[Receipt | BaseException]
        try:
            outcomes = list(self.log.append_many([e for e, _ in batch]))
        except Exception as exc:
            if len(batch) == 1:
                outcomes = [exc]
            else:
                # One malformed event must not fail a thousand requests: commit the rest one by one
                # so exactly the callers whose events cannot be stored hear about it.
                outcomes = []
                for e, _ in batch:
                    try:
                        outcomes.append(self.log.append(e))
                    except Exception as one:
                        outcomes.append(one)
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Receipt], Receipt | BaseException]]
        ]
        by_loop = {}
        for (_, waiter), out in zip(batch, outcomes, strict=True):
            if isinstance(waiter, Future):
                if not waiter.set_running_or_notify_cancel():
                    continue
                if isinstance(out, BaseException):
                    waiter.set_exception(out)
                else:
                    waiter.set_result(out)
            else:
                by_loop.setdefault(waiter[0], []).append((waiter[1], out))
        for loop, outs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, outs)

    def close(self, timeout: float | None = 30.0) -> None:
        """Commit everything queued, stop the thread; does not close the log."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join(timeout)


def events_by_time(log: AuditLog, since_us: int) -> Iterator[StoredEvent]:
    """Every event from `since_us` on, in index order, without loading them all at once."""
    after = -1
    while True:
        page = log.list_events(since_us=since_us, after=after, limit=1000)
        if not page:
            return
        yield from page
        after = page[-1].index
