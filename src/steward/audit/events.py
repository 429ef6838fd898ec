"""Audit events and their canonical leaf bytes.

A leaf is `canonical JSON of the metadata || 0x0A || payload ciphertext`. Canonical JSON (sorted keys,
no spaces, UTF-8, no NaN) never contains a raw newline, so the first 0x0A ends the metadata and the
rest is the ciphertext, byte for byte. The metadata includes the leaf's own index: moving a row to
another position is then visible from the row alone, not only from a root mismatch.

What an event may hold: identifiers, decisions and numbers. Raw prompts, answers and matched secrets
go only into `payload`, which is stored encrypted; the data subject (the request's `user`) is stored
only as a keyed pseudonym, so erasing the subject's keys leaves nothing that names them in clear.

Which tenant an event belongs to (the `tenant` column, whose auditors see it) is the principal's
tenant, unless the metadata has a top-level `tenant`: an admin act on another tenant is recorded
twice, once under the admin's tenant and once filed under the tenant it acted on (`filed_under`), so
the auditors of both see it and can prove it. The principal always names who acted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from steward.surrogates import escape_surrogates

LEAF_VERSION = 1
PAYLOAD_ALG = "A256GCM"

JSON = Any  # JSON-compatible value; checked at encoding time


class EventError(ValueError):
    """An event cannot be encoded, or stored leaf bytes do not parse as an event."""


def canonical_json(value: JSON) -> bytes:
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EventError(f"event is not canonical JSON: {exc}") from None
    # A lone surrogate (broken Unicode an upstream sent, kept in a payload) is written as its
    # escape, so a request never loses its record over it.
    return escape_surrogates(text).encode("utf-8")


def new_event_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    """RFC 3339 UTC with microseconds: one spelling per instant, and it sorts as text."""
    if t.tzinfo is None:
        raise EventError("event time must be timezone-aware")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def time_us(t: datetime) -> int:
    """Microseconds since the epoch, exactly (no float on the way)."""
    return (t - _EPOCH) // _US


def parse_time(s: str) -> datetime:
    # fromisoformat is C code (strptime costs ~30 us, a third of verifying a leaf); the length and
    # suffix checks keep it to the one spelling format_time writes.
    if len(s) != 27 or s[-1] != "Z" or s[10] != "T":
        raise EventError(f"bad event time {s!r}")
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        raise EventError(f"bad event time {s!r}") from None


@dataclass(frozen=True)
class Finding:
    """One guard verdict: what was found and what was done, never the matched text."""

    category: str
    score: float
    action: str
    stage: str = "input"
    scanner: str | None = None

    def to_json(self) -> dict[str, JSON]:
        d: dict[str, JSON] = {
            "category": self.category,
            "score": float(self.score),
            "action": self.action,
            "stage": self.stage,
        }
        if self.scanner is not None:
            d["scanner"] = self.scanner
        return d


@dataclass(frozen=True)
class Principal:
    """Who acted: key id (never the key), or only the key prefix for refusals before authentication."""

    tenant: str
    key_id: str | None = None
    key_prefix: str | None = None
    role: str | None = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "tenant": self.tenant,
            "key_id": self.key_id,
            "key_prefix": self.key_prefix,
            "role": self.role,
        }


@dataclass(frozen=True)
class AuditEvent:
    """What the gateway hands to the log. `payload` is encrypted; `subject` is pseudonymised."""

    kind: str  # "inference" | "refusal" | "admin" | "access" ...
    principal: Principal
    outcome: str  # "ok" | "blocked" | "error" | "refused" ...
    status: int | None = None
    request_id: str | None = None
    route: str | None = None
    model_id: str | None = None
    weights_hash: str | None = None
    policy_version: str | None = None
    findings: tuple[Finding, ...] = ()
    usage: Mapping[str, int] = field(default_factory=dict)
    latencies_ms: Mapping[str, float] = field(default_factory=dict)
    detail: Mapping[str, JSON] = field(default_factory=dict)
    subject: str | None = None
    payload: Mapping[str, JSON] | None = None
    event_id: str = field(default_factory=new_event_id)
    time: datetime = field(default_factory=utcnow)
    filed_under: str | None = None  # the tenant whose record this is, when not the principal's

    @property
    def tenant(self) -> str:
        """The tenant the event belongs to (its auditors read it; its keys encrypt its payload)."""
        return self.filed_under or self.principal.tenant

    def metadata(self, index: int, subject_ref: str | None, data_key: str | None) -> dict[str, JSON]:
        """The leaf's JSON part; `data_key` names the key that encrypted the payload (None: none)."""
        if not self.principal.tenant:
            raise EventError("event needs a tenant")
        if len(self.event_id) > 40:
            raise EventError("event id longer than 40 characters")
        meta: dict[str, JSON] = {
            "v": LEAF_VERSION,
            "idx": index,
            "id": self.event_id,
            "time": format_time(self.time),
            "kind": self.kind,
            "principal": self.principal.to_json(),
            "subject_ref": subject_ref,
            "request_id": self.request_id,
            "route": self.route,
            "model": {"id": self.model_id, "weights_hash": self.weights_hash},
            "policy_version": self.policy_version,
            "findings": [f.to_json() for f in self.findings],
            "usage": dict(self.usage),
            "latencies_ms": dict(self.latencies_ms),
            "outcome": self.outcome,
            "status": self.status,
            "detail": dict(self.detail),
            "payload": None if data_key is None else {"alg": PAYLOAD_ALG, "key": data_key},
        }
        if self.filed_under is not None and self.filed_under != self.principal.tenant:
            meta["tenant"] = self.filed_under  # only then: every other leaf keeps its exact old form
        return meta


def payload_aad(event_id: str, tenant: str) -> bytes:
    """Associated data binding a payload ciphertext to its event and tenant (no copy-paste between)."""
    return b"steward-audit-payload\x00" + event_id.encode() + b"\x00" + tenant.encode()


def encode_leaf(meta: Mapping[str, JSON], ciphertext: bytes) -> bytes:
    return canonical_json(meta) + b"\n" + ciphertext


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back from a leaf."""

    index: int
    meta: dict[str, JSON]
    ciphertext: bytes

    @property
    def event_id(self) -> str:
        return str(self.meta["id"])

    @property
    def tenant(self) -> str:
        """The tenant the event is filed under: `tenant` when the leaf has one, else the principal's."""
        filed = self.meta.get("tenant")
        return str(filed) if filed is not None else str(self.meta["principal"]["tenant"])

    @property
    def time(self) -> datetime:
        return parse_time(str(self.meta["time"]))

    @property
    def data_key(self) -> str | None:
        p = self.meta.get("payload")
        return str(p["key"]) if isinstance(p, dict) else None

    def columns(self) -> dict[str, Any]:
        """The indexed columns of `audit_events` as they must be for this leaf."""
        try:
            return self._columns()
        except (KeyError, TypeError, AttributeError):
            raise EventError("leaf metadata lacks required fields") from None

    def _columns(self) -> dict[str, Any]:
        return {
            "idx": self.meta["idx"],
            "event_id": self.event_id,
            "time_us": time_us(self.time),
            "tenant": self.tenant,
            "kind": self.meta["kind"],
            "request_id": self.meta["request_id"],
            "subject_ref": self.meta["subject_ref"],
            "outcome": self.meta["outcome"],
            "status": self.meta["status"],
        }

    @classmethod
    def from_leaf(cls, leaf: bytes, *, strict: bool = False, check: bool = True) -> StoredEvent:
        """Parse leaf bytes. `strict` also demands canonical JSON (what this code writes); the
        verifier does not need it, since the leaf hash covers the bytes whatever their form."""
        cut = leaf.find(b"\n")
        if cut < 0:
            raise EventError("leaf has no metadata terminator")
        try:
            meta = json.loads(leaf[:cut].decode())
        except ValueError:  # includes UnicodeDecodeError
            raise EventError("leaf metadata is not JSON") from None
        if (
            not isinstance(meta, dict)
            or meta.get("v") != LEAF_VERSION
            or not isinstance(meta.get("idx"), int)
        ):
            raise EventError("leaf metadata has an unknown version or no index")
        if strict and canonical_json(meta) != leaf[:cut]:
            raise EventError("leaf metadata is not in canonical form")
        ev = cls(meta["idx"], meta, leaf[cut + 1 :])
        if check:
            ev.columns()  # raises EventError when a field is missing or malformed
        return ev
