"""The guard stages of a request: input scan (with canary and redaction), output scan, stream scan.

The gateway holds one `steward.guard.Pipeline`. A tenant's policy comes from the policy file's
bindings, or from the tenant's `policy` field in the store (set by `PUT /admin/tenants/{id}`), which
is added as a binding the first time the tenant is seen. Every verdict goes into the trace; the
trace never holds matched text.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

from steward.gateway.errors import APIError
from steward.gateway.keys import Principal
from steward.gateway.trace import Trace

STREAM_WINDOW = 512
STREAM_OVERLAP = 128


@dataclass
class InputResult:
    ctx: Any  # steward.guard.ScanContext
    vault: Any  # steward.guard.Vault | None


@dataclass
class StreamScan:
    """One StreamGuard per choice index."""

    guard: Guard
    ctx: Any
    vault: Any
    guards: dict[int, Any] = field(default_factory=dict)

    def _for(self, index: int) -> Any:
        g = self.guards.get(index)
        if g is None:
            g = self.guards[index] = self.guard.pipeline.stream(
                self.ctx, self.vault, window=STREAM_WINDOW, overlap=STREAM_OVERLAP
            )
        return g

    async def feed(self, index: int, piece: str) -> Any:
        g = self._for(index)
        step = g.window - g.overlap
        if len(g.buffer) + len(piece) - g.scanned_to >= step:
            return await asyncio.to_thread(g.feed, piece)  # a window fills: the encoder runs
        return g.feed(piece)

    async def finish(self, index: int) -> Any:
        return await asyncio.to_thread(self._for(index).finish)

    def reports(self) -> list[dict[str, Any]]:
        return [{"stage": "output", "choice": i, **g.report()} for i, g in sorted(self.guards.items())]


class Guard:
    def __init__(self, policies: Any = None) -> None:
        from steward.guard import Pipeline

        self.pipeline = Pipeline(policies)
        self._bound: set[tuple[str, str]] = set()

    def _bind(self, p: Principal) -> None:
        """Honour the tenant's policy from the store as a binding (once per tenant and policy)."""
        name = p.tenant_policy
        if not name or (p.tenant, name) in self._bound:
            return
        ps = self.pipeline.policies
        if name not in ps.policies:
            raise APIError(
                500, f"tenant {p.tenant!r} names unknown guard policy {name!r}", code="policy_not_found"
            )
        from steward.guard.policy import Binding

        others = [b for b in ps.bindings if not (b.tenant == p.tenant and b.route == "*")]
        self.pipeline.policies = ps.model_copy(
            update={"bindings": [*others, Binding(tenant=p.tenant, route="*", policy=name)]}
        )
        self._bound.add((p.tenant, name))

    def policy_names(self) -> list[str]:
        return sorted(self.pipeline.policies.policies)

    async def scan_input(self, route: str, body: dict[str, Any], p: Principal, trace: Trace) -> InputResult:
        from steward.guard import Action, ScanContext

        self._bind(p)
        canary = None
        system = None
        if route == "chat":
            messages = body["messages"]
            for m in messages:
                if m.get("role") in ("system", "developer") and isinstance(m.get("content"), str):
                    system = (system + "\n" if system else "") + m["content"]
            if system is not None:
                # A canary the model never needs: seeing it in an answer proves the system prompt leaked.
                canary = "stw-canary-" + secrets.token_hex(6)
                for m in messages:
                    if m.get("role") in ("system", "developer") and isinstance(m.get("content"), str):
                        m["content"] = f"{m['content']}\n[{canary}]"
                        break
            scan_msgs = messages  # system turns get PII and secrets scans only (the policy engine)
        else:
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            scan_msgs = [{"role": "user", "content": t} for t in prompts]
        ctx = ScanContext(
            tenant=p.tenant, route=route, system_prompt=system, canary=canary, request_id=trace.request_id
        )
        v = await self.pipeline.scan_input(scan_msgs, ctx)
        trace.guard.append({"stage": "input", **v.to_trace()})
        trace.policy_version = f"{v.policy_name}@{v.policy_version[:12]}"
        if v.blocked:
            cats = ", ".join(v.categories) or "scanner error"
            raise APIError(
                400,
                f"the request was blocked by content policy {v.policy_name!r} ({cats})",
                code="content_policy_violation",
            )
        if v.action is Action.REDACT and v.messages is not None:
            if route == "chat":
                body["messages"] = v.messages
            else:
                texts = [m["content"] for m in v.messages]
                body["prompt"] = texts if isinstance(body["prompt"], list) else texts[0]
        return InputResult(ctx, v.vault)

    async def scan_output(self, route: str, out: dict[str, Any], inp: InputResult, trace: Trace) -> None:
        """Scan every choice; redact or restore its text, or cut it with `content_filter`."""
        for choice in out.get("choices") or []:
            if route == "chat":
                msg = choice.get("message") or {}
                text = msg.get("content")
            else:
                text = choice.get("text")
            if not isinstance(text, str) or not text:
                continue
            v = await self.pipeline.scan_output(text, inp.ctx, inp.vault)
            trace.guard.append({"stage": "output", "choice": choice.get("index", 0), **v.to_trace()})
            shown = "" if v.blocked else (v.text if v.text is not None else text)
            if v.blocked:
                choice["finish_reason"] = "content_filter"
            if route == "chat":
                msg["content"] = shown
            else:
                choice["text"] = shown

    def stream(self, inp: InputResult) -> StreamScan:
        return StreamScan(self, inp.ctx, inp.vault)
