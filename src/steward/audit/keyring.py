"""Data keys in the store: one per tenant (and per data subject), rotated by period, destroyed on demand.

Payload keys are chosen *before* the append transaction takes the log's lock, so a slow KMS never
holds up other writers. Keys live in `data_keys`, wrapped by the `KeyProvider`; destroying a key sets
`wrapped` to NULL, which makes every payload it encrypted unreadable without touching a leaf.

Subjects are stored as `subject_ref = HMAC-SHA256(tenant pseudonym key, subject)`: stable (so erasure
finds every key of the subject) but meaningless without the pseudonym key, which never leaves the
store unwrapped. The pseudonym key's row id is derived from the tenant, so concurrent workers cannot
create two different pseudonyms for one tenant.

Other processes cache unwrapped keys for `cache_ttl_s` seconds: an erasure reaches them within that
time, and a payload written meanwhile with a destroyed key is unreadable, which is what erasure wants.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from steward.audit.crypto import KEY_SIZE, KeyProvider, kek_id_of
from steward.audit.schema import DATA_KEYS

PAYLOAD = "payload"
PSEUDONYM = "pseudonym"
_T = DATA_KEYS


class PayloadUnavailable(RuntimeError):
    """The payload's data key was destroyed (erasure or retention) or is absent."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _wrap_aad(key_id: str, tenant: str, subject_ref: str | None, purpose: str) -> bytes:
    return b"\x00".join(
        [
            b"steward-data-key",
            key_id.encode(),
            tenant.encode(),
            (subject_ref or "").encode(),
            purpose.encode(),
        ]
    )


@dataclass
class _Cached:
    key_id: str
    key: bytes
    until: float


class KeyRing:
    def __init__(
        self,
        engine: Engine,
        provider: KeyProvider,
        *,
        key_period_s: float = 86_400.0,
        cache_ttl_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.provider = provider
        self.key_period_s = key_period_s
        self.cache_ttl_s = cache_ttl_s
        self._lock = threading.Lock()
        self._current: dict[tuple[str, str | None], _Cached] = {}
        self._pseudo: dict[str, bytes] = {}

    # --- pseudonyms ---------------------------------------------------------------------------------

    def _pseudonym_key(self, tenant: str) -> bytes:
        with self._lock:
            cached = self._pseudo.get(tenant)
        if cached is not None:
            return cached
        key_id = "ps_" + hashlib.sha256(tenant.encode()).hexdigest()[:32]
        aad = _wrap_aad(key_id, tenant, None, PSEUDONYM)
        with self.engine.connect() as conn:
            row = conn.execute(select(_T.c.wrapped).where(_T.c.id == key_id)).first()
        if row is None:
            fresh = os.urandom(KEY_SIZE)
            wrapped = self.provider.wrap(fresh, aad)
            try:
                with self.engine.begin() as conn:
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
            with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_T.c.id, _T.c.wrapped).where(*cond).order_by(_T.c.created_us.desc())
            ).first()
        if row is not None and row[1] is not None:
            return row[0], self.provider.unwrap(row[1], _wrap_aad(row[0], tenant, subject_ref, PAYLOAD))
        key_id = "dk_" + secrets.token_hex(16)
        key = os.urandom(KEY_SIZE)
        wrapped = self.provider.wrap(key, _wrap_aad(key_id, tenant, subject_ref, PAYLOAD))
        with self.engine.begin() as conn:
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
        with self.engine.connect() as conn:
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
        return self.provider.unwrap(wrapped, _wrap_aad(key_id, tenant, subject_ref, purpose))

    # --- lifecycle ----------------------------------------------------------------------------------

    def _forget(self) -> None:
        with self._lock:
            self._current.clear()

    def tenants(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(_T.c.tenant).distinct())]

    def erase_subject(self, subject: str, tenant: str | None = None) -> int:
        """Destroy every payload key of `subject` (in `tenant`, or in every tenant); returns the count."""
        tenants = [tenant] if tenant is not None else self.tenants()
        refs = [(t, self.subject_ref(t, subject)) for t in tenants]
        n = 0
        with self.engine.begin() as conn:
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
                n += res.rowcount
        self._forget()
        return n

    def rotate(self, tenant: str | None = None) -> int:
        """Retire current payload keys: new payloads get fresh keys, old ones stay readable."""
        stmt = update(_T).where(_T.c.purpose == PAYLOAD, _T.c.retired_us.is_(None), _T.c.wrapped.is_not(None))
        if tenant is not None:
            stmt = stmt.where(_T.c.tenant == tenant)
        with self.engine.begin() as conn:
            n = conn.execute(stmt.values(retired_us=_now_us())).rowcount
        self._forget()
        return n

    def expire(self, retention_s: float, now_us: int | None = None) -> int:
        """Destroy payload keys whose newest possible payload is older than `retention_s`.

        A key encrypts new payloads for at most `key_period_s` (plus the cache TTL) after its
        creation, so destroying it once that window ends `retention_s` ago loses nothing younger.
        """
        now_us = _now_us() if now_us is None else now_us
        cutoff = now_us - int((retention_s + self.key_period_s + self.cache_ttl_s) * 1_000_000)
        with self.engine.begin() as conn:
            n = conn.execute(
                update(_T)
                .where(_T.c.purpose == PAYLOAD, _T.c.wrapped.is_not(None), _T.c.created_us < cutoff)
                .values(wrapped=None, destroyed_us=now_us, destroy_reason="expired")
            ).rowcount
        self._forget()
        return n

    def rewrap(self) -> int:
        """Re-wrap every live data key under the provider's current KEK (after a KEK rotation)."""
        current = self.provider.current_kek_id
        n = 0
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(_T.c.id, _T.c.tenant, _T.c.subject_ref, _T.c.purpose, _T.c.wrapped).where(
                    _T.c.wrapped.is_not(None), _T.c.kek_id != current
                )
            ).all()
            for key_id, tenant, subject_ref, purpose, wrapped in rows:
                aad = _wrap_aad(key_id, tenant, subject_ref, purpose)
                fresh = self.provider.wrap(self.provider.unwrap(wrapped, aad), aad)
                conn.execute(update(_T).where(_T.c.id == key_id).values(wrapped=fresh, kek_id=current))
                n += 1
        return n
