"""Data keys in the store: one per tenant (and per data subject), rotated by period, destroyed on demand.

Payload keys are chosen *before* the append transaction takes the log's lock, so a slow KMS never
holds up other writers. Keys live in `data_keys`, wrapped by the `KeyProvider`; destroying a key sets
`wrapped` to NULL, which makes every payload it encrypted unreadable without touching a leaf.

Destroying must also destroy the bytes, not only the row's reference to them (`scrub`):
- SQLite: every write to `data_keys` runs with `PRAGMA secure_delete=ON`, so the old cell of a
  destroyed key, and any page freed by rebalancing the table, is overwritten with zeros instead of
  left as free space. The write-ahead log still holds the page as it was before (each commit appends
  a new page image), so after destroying keys the WAL is checkpointed into the database and
  truncated to zero bytes (`wal_checkpoint(TRUNCATE)`), retried for `scrub_wait_s` while other
  connections are reading. If readers keep it busy that long, `Scrub.complete` is False and says so:
  the old page images stay in `-wal` until the next checkpoint that completes.
- PostgreSQL: an UPDATE leaves the old row version as a dead tuple until VACUUM, and the old bytes
  can also stay in page free space, in WAL segments, on replicas and in backups. `scrub` runs
  `VACUUM data_keys` (small table, cheap) to shorten that window; it cannot promise physical
  erasure. What makes every such remnant useless is the KEK: rotate it, `rewrap` the live keys and
  retire the old KEK from the key file (or KMS), and every leftover wrapped copy is noise.
- Either store: copies of the database or of the KEK file made before the erasure (backups, disk
  snapshots, SSD blocks the filesystem released) are outside what Steward can reach.

Subjects are stored as `subject_ref = HMAC-SHA256(tenant pseudonym key, subject)`: stable (so erasure
finds every key of the subject) but meaningless without the pseudonym key, which never leaves the
store unwrapped. The pseudonym key's row id is derived from the tenant, so concurrent workers cannot
create two different pseudonyms for one tenant.

Other processes cache unwrapped keys for `cache_ttl_s` seconds: an erasure reaches them within that
time, and a payload written meanwhile with a destroyed key is unreadable, which is what erasure wants.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from steward.audit.crypto import KEY_SIZE, KeyProvider, kek_id_of
from steward.audit.schema import DATA_KEYS
from steward.store.db import reading

PAYLOAD = "payload"
PSEUDONYM = "pseudonym"
_T = DATA_KEYS
_log = logging.getLogger(__name__)


class PayloadUnavailable(RuntimeError):
    """The payload's data key was destroyed (erasure or retention) or is absent."""


def _now_us() -> int:
    return time.time_ns() // 1000


def wrap_aad(key_id: str, tenant: str, subject_ref: str | None, purpose: str) -> bytes:
    return b"\x00".join(
        [
            b"steward-data-key",
            key_id.encode(),
            tenant.encode(),
            (subject_ref or "").encode(),
            purpose.encode(),
        ]
    )


def _pragma(raw: Any, sql: str) -> tuple[Any, ...]:
    """Run a PRAGMA on the driver's connection (no SQLAlchemy autobegin); its first row."""
    cur = raw.cursor()
    try:
        cur.execute(sql)
        row = cur.fetchone()
    finally:
        cur.close()
    return tuple(row) if row is not None else ()


@dataclass(frozen=True)
class Scrub:
    """Whether the bytes of destroyed keys are gone from the store's files, in one line for humans."""

    complete: bool
    message: str


@dataclass
class _Cached:
    key_id: str
    key: bytes
    until: float


class KeyRing:
    SCRUB_WAIT_S = 10.0  # how long `scrub` retries a WAL checkpoint that readers keep busy

    def __init__(
        self,
        engine: Engine,
        provider: KeyProvider,
        *,
        key_period_s: float = 86_400.0,
        cache_ttl_s: float = 60.0,
        scrub_wait_s: float | None = None,
    ) -> None:
        self.engine = engine
        self._reader = reading(engine)
        self.provider = provider
        self.key_period_s = key_period_s
        self.cache_ttl_s = cache_ttl_s
        self.scrub_wait_s = self.SCRUB_WAIT_S if scrub_wait_s is None else scrub_wait_s
        self._sqlite = engine.dialect.name == "sqlite"
        self._lock = threading.Lock()
        self._current: dict[tuple[str, str | None], _Cached] = {}
        self._pseudo: dict[str, bytes] = {}
        self._pg_written_xid: str | None = None  # 32-bit xid of this process's last data_keys write

    # --- pseudonyms ---------------------------------------------------------------------------------

    def _pseudonym_key(self, tenant: str) -> bytes:
        with self._lock:
            cached = self._pseudo.get(tenant)
        if cached is not None:
            return cached
        key_id = "ps_" + hashlib.sha256(tenant.encode()).hexdigest()[:32]
        aad = wrap_aad(key_id, tenant, None, PSEUDONYM)
        with self._reader.connect() as conn:
            row = conn.execute(select(_T.c.wrapped).where(_T.c.id == key_id)).first()
        if row is None:
            fresh = os.urandom(KEY_SIZE)
            wrapped = self.provider.wrap(fresh, aad)
            try:
                with self._writing() as conn:
                    conn.execute(
                        insert(_T).values(
                            id=key_id,
                            tenant=tenant,
                            subject_ref=None,
                            purpose=PSEUDONYM,
                            created_us=_now_us(),
                            kek_id=kek_id_of(wrapped),
                            wrapped=wrapped,
                        )
                    )
            except IntegrityError:
                pass  # another worker created it first; read theirs below
            with self._reader.connect() as conn:
                row = conn.execute(select(_T.c.wrapped).where(_T.c.id == key_id)).first()
        if row is None or row[0] is None:
            raise PayloadUnavailable(f"pseudonym key of tenant {tenant!r} is missing")
        key = self.provider.unwrap(row[0], aad)
        with self._lock:
            self._pseudo[tenant] = key
        return key

    def subject_ref(self, tenant: str, subject: str) -> str:
        return hmac.new(self._pseudonym_key(tenant), subject.encode(), hashlib.sha256).hexdigest()[:40]

    # --- payload keys -------------------------------------------------------------------------------

    def payload_key(self, tenant: str, subject_ref: str | None) -> tuple[str, bytes]:
        """(key id, key) for new payloads of this tenant/subject; created when none is current."""
        slot = (tenant, subject_ref)
        now = time.monotonic()
        with self._lock:
            c = self._current.get(slot)
            if c is not None and c.until > now:
                return c.key_id, c.key
        key_id, key = self._load_or_create(tenant, subject_ref)
        with self._lock:
            self._current[slot] = _Cached(key_id, key, now + self.cache_ttl_s)
        return key_id, key

    def _load_or_create(self, tenant: str, subject_ref: str | None) -> tuple[str, bytes]:
        horizon = _now_us() - int(self.key_period_s * 1_000_000)
        cond = [
            _T.c.tenant == tenant,
            _T.c.purpose == PAYLOAD,
            _T.c.subject_ref.is_(None) if subject_ref is None else _T.c.subject_ref == subject_ref,
            _T.c.wrapped.is_not(None),
            _T.c.retired_us.is_(None),
            _T.c.created_us >= horizon,
        ]
        with self._reader.connect() as conn:
            row = conn.execute(
                select(_T.c.id, _T.c.wrapped).where(*cond).order_by(_T.c.created_us.desc())
            ).first()
        if row is not None and row[1] is not None:
            return row[0], self.provider.unwrap(row[1], wrap_aad(row[0], tenant, subject_ref, PAYLOAD))
        key_id = "dk_" + secrets.token_hex(16)
        key = os.urandom(KEY_SIZE)
        wrapped = self.provider.wrap(key, wrap_aad(key_id, tenant, subject_ref, PAYLOAD))
        with self._writing() as conn:
            conn.execute(
                insert(_T).values(
                    id=key_id,
                    tenant=tenant,
                    subject_ref=subject_ref,
                    purpose=PAYLOAD,
                    created_us=_now_us(),
                    kek_id=kek_id_of(wrapped),
                    wrapped=wrapped,
                )
            )
        return key_id, key

    def key_by_id(self, key_id: str) -> bytes:
        """The key for reading a payload; raises PayloadUnavailable once destroyed."""
        with self._reader.connect() as conn:
            row = conn.execute(
                select(_T.c.tenant, _T.c.subject_ref, _T.c.purpose, _T.c.wrapped, _T.c.destroy_reason).where(
                    _T.c.id == key_id
                )
            ).first()
        if row is None:
            raise PayloadUnavailable(f"data key {key_id} does not exist")
        tenant, subject_ref, purpose, wrapped, reason = row
        if wrapped is None:
            raise PayloadUnavailable(
                f"payload unavailable: its data key was destroyed ({reason or 'destroyed'})"
            )
        return self.provider.unwrap(wrapped, wrap_aad(key_id, tenant, subject_ref, purpose))

    # --- lifecycle ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction on `data_keys`; on SQLite with `secure_delete` on for its duration,
        so what the write frees (a destroyed key's old cell, pages freed by rebalancing) is zeroed."""
        with self.engine.connect() as conn:
            raw = conn.connection.dbapi_connection if self._sqlite else None
            before = None
            if raw is not None:  # outside the transaction: BEGIN IMMEDIATE comes with conn.begin()
                before = int(_pragma(raw, "PRAGMA secure_delete")[0])
                _pragma(raw, "PRAGMA secure_delete=ON")
            try:
                with conn.begin():
                    if raw is None:  # PostgreSQL: the xid whose old row versions `scrub` waits for
                        xid = int(conn.execute(text("SELECT txid_current()")).scalar_one())
                    yield conn
                if raw is None:
                    self._pg_written_xid = str(xid % (1 << 32))
            finally:
                if raw is not None and before is not None:
                    with contextlib.suppress(sqlite3.Error):
                        _pragma(raw, f"PRAGMA secure_delete={before}")

    def _forget(self) -> None:
        with self._lock:
            self._current.clear()

    def tenants(self) -> list[str]:
        with self._reader.connect() as conn:
            return [r[0] for r in conn.execute(select(_T.c.tenant).distinct())]

    def erase_subject(self, subject: str, tenant: str | None = None) -> int:
        """Destroy every payload key of `subject` (in `tenant`, or in every tenant); returns the count.

        Leaves the old bytes to `scrub`; `AuditLog.erase_subject` does both and records the act."""
        return sum(self.erase_subject_by_tenant(subject, tenant).values())

    def erase_subject_by_tenant(self, subject: str, tenant: str | None = None) -> dict[str, int]:
        """Like `erase_subject`, with the number of keys destroyed per tenant (tenants in scope)."""
        tenants = [tenant] if tenant is not None else self.tenants()
        refs = [(t, self.subject_ref(t, subject)) for t in tenants]
        out: dict[str, int] = {}
        with self._writing() as conn:
            for t, ref in refs:
                res = conn.execute(
                    update(_T)
                    .where(
                        _T.c.tenant == t,
                        _T.c.subject_ref == ref,
                        _T.c.purpose == PAYLOAD,
                        _T.c.wrapped.is_not(None),
                    )
                    .values(wrapped=None, destroyed_us=_now_us(), destroy_reason="erased")
                )
                out[t] = out.get(t, 0) + res.rowcount
        self._forget()
        return out

    def rotate(self, tenant: str | None = None) -> int:
        """Retire current payload keys: new payloads get fresh keys, old ones stay readable."""
        stmt = update(_T).where(_T.c.purpose == PAYLOAD, _T.c.retired_us.is_(None), _T.c.wrapped.is_not(None))
        if tenant is not None:
            stmt = stmt.where(_T.c.tenant == tenant)
        with self._writing() as conn:
            n = conn.execute(stmt.values(retired_us=_now_us())).rowcount
        self._forget()
        return n

    def expire(self, retention_s: float, now_us: int | None = None) -> int:
        """Destroy payload keys whose newest possible payload is older than `retention_s`.

        A key encrypts new payloads for at most `key_period_s` (plus the cache TTL) after its
        creation, so destroying it once that window ends `retention_s` ago loses nothing younger.
        """
        return sum(self.expire_by_tenant(retention_s, now_us).values())

    def expire_by_tenant(self, retention_s: float, now_us: int | None = None) -> dict[str, int]:
        """Like `expire`, with the number of keys destroyed per tenant (only tenants that lost any)."""
        now_us = _now_us() if now_us is None else now_us
        cutoff = now_us - int((retention_s + self.key_period_s + self.cache_ttl_s) * 1_000_000)
        cond = (_T.c.purpose == PAYLOAD, _T.c.wrapped.is_not(None), _T.c.created_us < cutoff)
        out: dict[str, int] = {}
        with self._writing() as conn:
            for (t,) in conn.execute(select(_T.c.tenant).where(*cond).distinct()).all():
                out[t] = conn.execute(
                    update(_T)
                    .where(_T.c.tenant == t, *cond)
                    .values(wrapped=None, destroyed_us=now_us, destroy_reason="expired")
                ).rowcount
        self._forget()
        return {t: n for t, n in out.items() if n}

    def rewrap(self) -> int:
        """Re-wrap every live data key under the provider's current KEK (after a KEK rotation)."""
        current = self.provider.current_kek_id
        n = 0
        with self._writing() as conn:
            rows = conn.execute(
                select(_T.c.id, _T.c.tenant, _T.c.subject_ref, _T.c.purpose, _T.c.wrapped).where(
                    _T.c.wrapped.is_not(None), _T.c.kek_id != current
                )
            ).all()
            for key_id, tenant, subject_ref, purpose, wrapped in rows:
                aad = wrap_aad(key_id, tenant, subject_ref, purpose)
                fresh = self.provider.wrap(self.provider.unwrap(wrapped, aad), aad)
                conn.execute(update(_T).where(_T.c.id == key_id).values(wrapped=fresh, kek_id=current))
                n += 1
        return n

    # --- scrubbing ----------------------------------------------------------------------------------

    def scrub(self) -> Scrub:
        """Remove the old bytes of destroyed keys from the store's files, as far as the store allows
        (see the module docstring). Never raises for a busy store: the result says what is left."""
        return self._scrub_sqlite() if self._sqlite else self._scrub_postgres()

    def _scrub_sqlite(self) -> Scrub:
        deadline = time.monotonic() + self.scrub_wait_s
        tries = 0
        why = "busy"
        while True:
            tries += 1
            try:
                with self.engine.connect() as conn:
                    row = _pragma(conn.connection.dbapi_connection, "PRAGMA wal_checkpoint(TRUNCATE)")
                busy, frames = int(row[0]), int(row[1])
                if not busy and frames <= 0:  # -1: not in WAL mode, nothing to truncate
                    return Scrub(True, "write-ahead log checkpointed and truncated")
                why = f"{frames} frame(s) still in the write-ahead log, readers active"
            except sqlite3.OperationalError as exc:
                why = str(exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.05 * tries, 0.5))
        msg = (
            f"could not checkpoint the write-ahead log within {self.scrub_wait_s:g}s ({why}): the "
            "destroyed keys stay recoverable from the -wal file (with the KEK) until the next "
            "checkpoint completes; run `steward audit erase` again or stop the gateway to finish"
        )
        _log.warning(msg)
        return Scrub(False, msg)

    def _scrub_postgres(self) -> Scrub:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.execute(text(f"VACUUM {_T.name}"))
                holders = conn.execute(text(_PG_HOLDERS), {"xid": self._pg_written_xid}).one()
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            msg = (
                f"VACUUM {_T.name} failed ({type(cause).__name__}): the destroyed keys' old "
                "row versions stay in the table until the next (auto)vacuum"
            )
            _log.warning(msg)
            return Scrub(False, msg)
        sessions, prepared, slots = (int(n or 0) for n in holders)
        if sessions or prepared or slots:
            why = ", ".join(
                f"{n} {what}"
                for n, what in (
                    (sessions, "session(s) with a snapshot or transaction older than the destruction"),
                    (prepared, "prepared transaction(s)"),
                    (slots, "replication slot(s)"),
                )
                if n
            )
            msg = (
                f"VACUUM {_T.name} could not remove the destroyed keys' old row versions yet: {why} "
                "still may see them (idle-in-transaction sessions, long reports, pg_dump), so their "
                "bytes stay in the table file (and later in page free space) until those end; a later "
                "scrub finishes it (run `steward audit erase` again, or the next erasure or expiry does)"
            )
            _log.warning(msg)
            return Scrub(False, msg)
        self._pg_written_xid = None
        return Scrub(
            True,
            f"VACUUM {_T.name} done; old bytes may remain in PostgreSQL's WAL and backups "
            "until they are recycled (rotate the KEK to make them useless)",
        )


# What keeps VACUUM from removing the old row versions of the newest destruction in `data_keys`:
# any snapshot (backend_xmin), running transaction (backend_xid), prepared transaction or
# replication slot as old as the transaction that destroyed (or re-wrapped) keys. That transaction
# is the newest `xmin` among destroyed rows (their current versions were written by it), or the
# newest write this process made (`:xid`, re-wraps included). Older xid <=> larger age().
_PG_HOLDERS = f"""
WITH target AS (
    SELECT LEAST(
        (SELECT min(age(xmin)) FROM {_T.name} WHERE wrapped IS NULL),
        age(CAST(CAST(:xid AS text) AS xid))
    ) AS a
)
SELECT
    (SELECT count(*) FROM pg_stat_activity, target
      WHERE pid <> pg_backend_pid()
        AND backend_type IS DISTINCT FROM 'autovacuum worker'
        AND (datname = current_database() OR datname IS NULL)
        AND (age(backend_xmin) >= target.a OR age(backend_xid) >= target.a)),
    (SELECT count(*) FROM pg_prepared_xacts, target
      WHERE database = current_database() AND age(transaction) >= target.a),
    (SELECT count(*) FROM pg_replication_slots, target
      WHERE (database IS NULL OR database = current_database()) AND age(xmin) >= target.a)
"""
