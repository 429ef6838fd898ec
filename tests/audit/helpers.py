"""Event factories shared by the audit tests."""

from __future__ import annotations

from steward.audit.events import AuditEvent, Finding, Principal

SECRET_PROMPT = "my card is 4111 1111 1111 1111 and my name is Zebulon Quackenbush"


def make_event(
    i: int, *, tenant: str = "acme", subject: str | None = None, payload: bool = True
) -> AuditEvent:
    return AuditEvent(
        kind="inference",
        principal=Principal(tenant=tenant, key_id=f"key{i % 3}", role="user"),
        outcome="ok" if i % 5 else "blocked",
        status=200 if i % 5 else 403,
        request_id=f"req-{i}",
        route="/v1/chat/completions",
        model_id="steward-tiny",
        weights_hash="ab" * 32,
        policy_version="p1",
        findings=(Finding("pii", 0.93, "redact"),) if i % 2 else (),
        usage={"prompt_tokens": 10 + i, "completion_tokens": 5},
        latencies_ms={"total": 12.5, "guard": 1.25},
        subject=subject,
        payload={"prompt": f"{SECRET_PROMPT} #{i}", "answer": f"answer {i}"} if payload else None,
    )
