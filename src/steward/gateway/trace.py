"""The decision trace: one object per request, filled as the request passes each stage.

It is the seam for transparency (`steward.explain` renders it), for the audit log (it becomes the
event) and for the console. It holds what was decided and why, never key material or prompt text.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Trace:
    request_id: str
    route: str
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    key_prefix: str | None = None
    tenant: str | None = None
    role: str | None = None
    model: str | None = None
    backend: str | None = None
    weights_sha256: str | None = None
    policy_version: str | None = None
    stream: bool = False
    user: str | None = None  # the data subject the request names (OpenAI `user`), if any
    guard: list[dict[str, Any]] = field(default_factory=list)  # verdicts, each with its findings
    usage: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    status: int = 0
    outcome: str = "pending"  # ok | blocked | refused | error | cancelled
    error: dict[str, Any] | None = None
    backend_s: float = 0.0  # time inside backends, excluded from the overhead figure
    # Prompt and answer: only ever stored encrypted (audit); never in `to_dict`, logs or metrics.
    payload: dict[str, Any] | None = field(default=None, repr=False)
    audit: dict[str, Any] | None = None  # the committed event's index and id
    extra: dict[str, Any] = field(default_factory=dict)  # route-specific facts (admin targets, ...)

    def mark(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.latency_ms[stage] = round((now - since) * 1000, 3)
        return now

    def overhead_ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.t0 - self.backend_s) * 1000)

    def finish(self, status: int, outcome: str, error: dict[str, Any] | None = None) -> None:
        self.status = status
        self.outcome = outcome
        self.error = error
        self.latency_ms["total"] = round((time.perf_counter() - self.t0) * 1000, 3)
        self.latency_ms["backend"] = round(self.backend_s * 1000, 3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("t0", None)
        d.pop("backend_s", None)
        d.pop("payload", None)
        d.pop("extra", None)
        return d
