"""API keys and tenants on the store.

A key is `sk-stw-` + 43 URL-safe characters (256 random bits). Only its SHA-256 is stored: the key has
full entropy, so a fast hash is as safe as a slow one and keeps the lookup per request cheap. The
lookup is by hash, and the stored hash is compared again with `hmac.compare_digest`, so no timing
depends on how much of a guessed key was right. A short prefix (`sk-stw-` + 4 characters) is kept to
let people tell their keys apart; it is what logs and refusal events show.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from steward.store import StoreError
from steward.store.db import reading
from steward.store.models import ApiKey, Tenant

KEY_PREFIX = "sk-stw-"
KEY_RE = re.compile(r"^sk-stw-[A-Za-z0-9_-]{43}\Z")
# A leading "_" is reserved for the gateway's own pseudo-tenants (the audit log files refusals that
# come before any key is known under "_unauthenticated"), so no key can be made in one.
TENANT_RE = re.compile(r"^[A-Za-z0-9.-][A-Za-z0-9_.-]{0,63}\Z")
ROLES = ("admin", "user", "auditor")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 4]


@dataclass(frozen=True)
class Principal:
    """Who is calling: what the trace, the limits and the audit log know about a request's caller."""

    key_id: str
    key_prefix: str
    tenant: str
    role: str
    allowed_models: tuple[str, ...] | None
    key_limits: tuple[dict[str, Any], ...] = ()
    tenant_limits: tuple[dict[str, Any], ...] = ()
    tenant_policy: str | None = None
    expires_at: float | None = None

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass
class KeyRecord:
    id: str
    prefix: str
    tenant: str
    role: str
    name: str | None
    models: list[str] | None
    limits: list[dict[str, Any]]
    created_at: str
    expires_at: str | None
    revoked_at: str | None

    def public(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.isoformat()


def _aware(t: datetime | None) -> datetime | None:
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    return t


def _record(k: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=k.id,
        prefix=k.prefix,
        tenant=k.tenant_id,
        role=k.role,
        name=k.name,
        models=k.allowed_models,
        limits=list(k.limits or []),
        created_at=_iso(k.created_at) or "",
        expires_at=_iso(k.expires_at),
        revoked_at=_iso(k.revoked_at),
    )


class UnknownKeyError(LookupError):
    """No such key (for revoke)."""


@dataclass
class _Cached:
    principal: Principal | None
    at: float


@dataclass
class KeyStore:
    """Keys and tenants on an engine, with a short cache so a hot key costs no query per request.

    The cache entry lives `ttl_s` (≤ 1 s): a revocation on any replica is seen by every replica within
    that time. Unknown keys are not cached, so junk cannot fill memory; they cost one indexed query.
    """

    engine: Engine
    ttl_s: float = 0.5
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- tenants --------------------------------------------------------------------------------------
    def ensure_tenant(self, s: Session, tenant: str) -> Tenant:
        if not TENANT_RE.match(tenant):
            raise ValueError(
                f"invalid tenant id {tenant[:80]!r}: use 1-64 of [A-Za-z0-9_.-], not starting with '_'"
            )
        t = s.get(Tenant, tenant)
        if t is None:
            # Insert-if-absent, then read: two transactions creating the same new tenant at once
            # (PostgreSQL's READ COMMITTED lets both see it missing) must not fail on the key.
            insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
            s.execute(
                insert(Tenant)
                .values(id=tenant, created_at=datetime.now(UTC), policy=None, limits=[])
                .on_conflict_do_nothing(index_elements=["id"])
            )
            t = s.get(Tenant, tenant)
            if t is None:  # pragma: no cover - the row exists once the insert returns
                raise StoreError(f"tenant {tenant!r} could not be created")
        return t

    def set_tenant(
        self, tenant: str, *, limits: Sequence[dict[str, Any]] | None = None, policy: str | None = None
    ) -> dict[str, Any]:
        with self._session() as s:
            t = self.ensure_tenant(s, tenant)
            if limits is not None:
                t.limits = list(limits)
            if policy is not None:
                t.policy = policy
            out = {"id": t.id, "limits": t.limits, "policy": t.policy, "created_at": _iso(t.created_at)}
        self._cache.clear()
        return out

    def list_tenants(self) -> list[dict[str, Any]]:
        with self._session(read=True) as s:
            rows = s.scalars(select(Tenant).order_by(Tenant.id)).all()
            return [
                {"id": t.id, "limits": t.limits, "policy": t.policy, "created_at": _iso(t.created_at)}
                for t in rows
            ]

    # -- keys -----------------------------------------------------------------------------------------
    def create(
        self,
        tenant: str,
        role: str,
        *,
        name: str | None = None,
        models: Sequence[str] | None = None,
        expires_in_s: int | None = None,
        limits: Sequence[dict[str, Any]] = (),
    ) -> tuple[str, KeyRecord]:
        """Create a key; returns the key itself (shown once, never stored) and its record."""
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")
        key = new_key()
        now = datetime.now(UTC)
        with self._session() as s:
            self.ensure_tenant(s, tenant)
            row = ApiKey(
                id="key_" + secrets.token_hex(8),
                prefix=display_prefix(key),
                hash=hash_key(key),
                tenant_id=tenant,
                role=role,
                name=name,
                allowed_models=list(models) if models is not None else None,
                limits=list(limits),
                created_at=now,
                expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s else None,
                revoked_at=None,
            )
            s.add(row)
            s.flush()
            return key, _record(row)

    def list(self, tenant: str | None = None) -> list[KeyRecord]:
        with self._session(read=True) as s:
            q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
            if tenant is not None:
                q = q.where(ApiKey.tenant_id == tenant)
            return [_record(k) for k in s.scalars(q).all()]

    def get(self, key_id: str) -> KeyRecord | None:
        with self._session(read=True) as s:
            k = s.get(ApiKey, key_id)
            return _record(k) if k is not None else None

    def revoke(self, key_id: str) -> KeyRecord:
        with self._session() as s:
            k = s.get(ApiKey, key_id)
            if k is None:
                raise UnknownKeyError(f"no key with id {key_id[:80]!r}")
            if k.revoked_at is None:
                k.revoked_at = datetime.now(UTC)
            rec = _record(k)
        with self._lock:
            self._cache.clear()
        return rec

    # -- authentication -------------------------------------------------------------------------------
    def authenticate(self, key: str, now: float | None = None) -> Principal | None:
        """The principal for a presented key, or None when it is malformed, unknown, expired or revoked."""
        if not KEY_RE.match(key):
            return None
        h = hash_key(key)
        t = time.monotonic()
        cached = self._cache.get(h)
        if cached is not None and t - cached.at < self.ttl_s:
            p = cached.principal
        else:
            p = self._load(h)
            with self._lock:
                if p is not None or h in self._cache:
                    self._cache[h] = _Cached(p, t)
        if p is None:
            return None
        if p.expires_at is not None and (now if now is not None else time.time()) >= p.expires_at:
            return None
        return p

    def authenticate_cached(self, key: str) -> Principal | Literal[False] | None:
        """Answer from memory when possible (no I/O: safe on the event loop); False = ask the store."""
        if not KEY_RE.match(key):
            return None
        cached = self._cache.get(hash_key(key))
        if cached is None or time.monotonic() - cached.at >= self.ttl_s:
            return False
        p = cached.principal
        if p is not None and p.expires_at is not None and time.time() >= p.expires_at:
            return None
        return p

    def _load(self, h: str) -> Principal | None:
        with self._session(read=True) as s:
            k = s.scalars(select(ApiKey).where(ApiKey.hash == h)).first()
            if k is None or not hmac.compare_digest(k.hash, h) or k.revoked_at is not None:
                return None
            tenant = s.get(Tenant, k.tenant_id)
            exp = _aware(k.expires_at)
            return Principal(
                key_id=k.id,
                key_prefix=k.prefix,
                tenant=k.tenant_id,
                role=k.role,
                allowed_models=tuple(k.allowed_models) if k.allowed_models is not None else None,
                key_limits=tuple(k.limits or ()),
                tenant_limits=tuple(tenant.limits or ()) if tenant is not None else (),
                tenant_policy=tenant.policy if tenant is not None else None,
                expires_at=exp.timestamp() if exp is not None else None,
            )

    def _session(self, *, read: bool = False) -> _SessionCtx:
        return _SessionCtx(reading(self.engine) if read else self.engine)


class _SessionCtx:
    """A session in one transaction; store failures surface as `StoreError` (the caller fails closed)."""

    def __init__(self, engine: Engine) -> None:
        self.session = Session(engine, expire_on_commit=False)

    def __enter__(self) -> Session:
        return self.session

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.session.commit()
            else:
                self.session.rollback()
        except SQLAlchemyError as err:
            raise StoreError(f"store error: {' '.join(str(err).split())[:300]}") from None
        finally:
            self.session.close()
        if isinstance(exc, SQLAlchemyError):
            raise StoreError(f"store error: {' '.join(str(exc).split())[:300]}") from None
