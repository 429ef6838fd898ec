"""The data every scanner, the policy engine and the gateway's trace share.

A `Finding` is one detection with enough context to explain itself (category, entity, score against
threshold, where in the *original* text, what the policy does about it and why), so a trace can show a
user exactly why a request was blocked without re-running anything. A `Finding` never carries the
matched text itself: secrets and PII must not reach logs or stored traces in clear.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CATEGORIES",
    "Action",
    "Category",
    "Finding",
    "ScanContext",
    "ScannerError",
    "Span",
    "Verdict",
    "strongest",
]

Category = Literal["pii", "secrets", "prompt_injection", "jailbreak", "harmful", "toxicity", "prompt_leak"]
CATEGORIES: tuple[Category, ...] = (
    "pii",
    "secrets",
    "prompt_injection",
    "jailbreak",
    "harmful",
    "toxicity",
    "prompt_leak",
)

Role = Literal["user", "document", "system", "assistant"]


class Action(enum.StrEnum):
    """What the policy does with a finding; ordered so the strongest action wins a request."""

    ALLOW = "allow"
    FLAG = "flag"
    REDACT = "redact"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Action.ALLOW: 0, Action.FLAG: 1, Action.REDACT: 2, Action.BLOCK: 3}


def strongest(actions: list[Action]) -> Action:
    """The action that governs a request: block > redact > flag > allow."""
    return max(actions, key=lambda a: a.rank, default=Action.ALLOW)


class ScannerError(RuntimeError):
    """A scanner could not produce a result; the policy decides whether that blocks (fail-closed)."""


@dataclass(frozen=True, slots=True)
class Span:
    """Half-open character range [start, end) into the original text."""

    start: int
    end: int


@dataclass(slots=True)
class Finding:
    """One detection.

    `score` is the detector's confidence in [0, 1]; `threshold` the policy's cut-off for this
    scanner; a finding whose score is under the threshold is kept (for traces and scores) but gets
    action `allow`. `decoded` marks findings made inside decoded base64/hex or hidden tag text.
    """

    category: Category
    entity: str
    score: float
    spans: list[Span]
    reason: str
    scanner: str = ""
    threshold: float = 0.5
    action: Action = Action.ALLOW
    decoded: bool = False
    subtype: str | None = None
    message: int | None = None

    @property
    def start(self) -> int:
        return min(s.start for s in self.spans) if self.spans else 0

    @property
    def end(self) -> int:
        return max(s.end for s in self.spans) if self.spans else 0

    @property
    def triggered(self) -> bool:
        return self.score >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for traces: offsets and scores, never the matched text."""
        out: dict[str, Any] = {
            "category": self.category,
            "entity": self.entity,
            "start": self.start,
            "end": self.end,
            "score": round(self.score, 4),
            "threshold": self.threshold,
            "action": self.action.value,
            "reason": self.reason,
            "scanner": self.scanner,
        }
        if len(self.spans) > 1:
            out["spans"] = [[s.start, s.end] for s in self.spans]
        if self.decoded:
            out["decoded"] = True
        if self.subtype:
            out["subtype"] = self.subtype
        if self.message is not None:
            out["message"] = self.message
        return out


@dataclass(slots=True)
class ScanContext:
    """Who is asking and about what: selects the policy and feeds context-aware scanners.

    `system_prompt` and `canary` let the output leakage scanner recognise the system prompt.
    """

    tenant: str = "default"
    route: str = "default"
    role: Role = "user"
    system_prompt: str | None = None
    canary: str | None = None
    request_id: str | None = None


@dataclass(slots=True)
class Verdict:
    """The outcome of scanning one input or output against a policy, explained.

    `action` is the strongest action among triggered findings (or `block` for a fail-closed scanner
    error). `text`/`messages` hold the redacted content when the action is `redact`; `vault` then
    holds the pseudonyms to restore the answer with. `scanned` is False only when nothing was scanned
    (empty policy list); a caller must never claim a text was checked when it was not.
    """

    direction: Literal["input", "output"]
    action: Action
    findings: list[Finding]
    policy_name: str
    policy_version: str
    latency_ms: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    scanned: bool = True
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    vault: Any = None

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    @property
    def categories(self) -> list[str]:
        """Every category with a finding at or over its threshold, whatever the action."""
        seen = {f.category for f in self.findings if f.triggered}
        return [c for c in CATEGORIES if c in seen]

    @property
    def flagged(self) -> bool:
        return bool(self.categories)

    def explain(self) -> str:
        """One human-readable paragraph: what was found, what was done, under which policy."""
        hits = [f for f in self.findings if f.triggered]
        head = f"{self.direction} {self.action.value} by policy {self.policy_name}@{self.policy_version[:12]}"
        if self.errors:
            head += "; scanner errors: " + ", ".join(f"{k}: {v}" for k, v in self.errors.items())
        if not hits:
            return head + ": nothing over threshold."
        parts = [
            f"{f.category}/{f.entity} at {f.start}-{f.end} score {f.score:.2f} >= {f.threshold:.2f} "
            f"-> {f.action.value} ({f.reason})"
            for f in hits
        ]
        return head + ": " + "; ".join(parts)

    def to_trace(self) -> dict[str, Any]:
        """What the gateway stores in a request's decision trace (no clear-text payload)."""
        return {
            "direction": self.direction,
            "action": self.action.value,
            "flagged": self.flagged,
            "categories": self.categories,
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "policy": self.policy_name,
            "policy_version": self.policy_version,
            "scanned": self.scanned,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "errors": dict(self.errors),
            "findings": [f.to_dict() for f in self.findings],
            "explanation": self.explain(),
        }
