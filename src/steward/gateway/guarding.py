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
        self._file = self.pipeline.policies  # the policy file's own bindings
        self._stored: dict[str, str] = {}  # tenant -> policy named in the store, as last applied

    def bind(self, p: Principal) -> None:
        """Honour the tenant's policy from the store as a binding of all its routes. Checked on every
        request, so a change made with `PUT /admin/tenants/{id}` (or a policy cleared with "") takes
        effect at the tenant's next request, and a cleared one gives the policy file's binding back."""
        name = p.tenant_policy or None
        if self._stored.get(p.tenant) == name:
            return
        if name is not None and name not in self._file.policies:
            raise APIError(
                500, f"tenant {p.tenant!r} names unknown guard policy {name!r}", code="policy_not_found"
            )
        from steward.guard.policy import Binding

        stored = dict(self._stored)
        if name is None:
            stored.pop(p.tenant, None)
        else:
            stored[p.tenant] = name
        kept = [b for b in self._file.bindings if not (b.tenant in stored and b.route == "*")]
        added = [Binding(tenant=t, route="*", policy=n) for t, n in sorted(stored.items())]
        self.pipeline.policies = self._file.model_copy(update={"bindings": [*kept, *added]})
        self._stored = stored

    def policy_names(self) -> list[str]:
        return sorted(self.pipeline.policies.policies)

    async def scan_input(self, route: str, body: dict[str, Any], p: Principal, trace: Trace) -> InputResult:
        """Scan everything of the request that reaches the model: chat turns (system, user, earlier
        assistant turns and documents, by the policy), completion prompts and `suffix`, embedding
        inputs. Raises a 400 when the policy blocks, naming the categories or why nothing was
        scanned; redacts the body in place when the policy redacts."""
        from steward.guard import Action, ScanContext
        from steward.guard.pipeline import content_text

        self.bind(p)
        canary = None
        system = None
        if route == "chat":
            messages = body["messages"]
            for m in messages:
                text = content_text(m.get("content")) if m.get("role") in ("system", "developer") else None
                if text is not None:
                    system = (system + "\n" if system else "") + text
            if system is not None:
                # A canary the model never needs: seeing it in an answer proves the system prompt leaked.
                canary = "stw-canary-" + secrets.token_hex(6)
                for m in messages:
                    if (
                        m.get("role") in ("system", "developer")
                        and content_text(m.get("content")) is not None
                    ):
                        if isinstance(m["content"], str):
                            m["content"] = f"{m['content']}\n[{canary}]"
                        else:
                            m["content"] = [*m["content"], {"type": "text", "text": f"[{canary}]"}]
                        break
            scan_msgs = messages  # the policy engine decides what each role is scanned for
        else:
            key = "input" if route == "embeddings" else "prompt"
            prompts = body[key] if isinstance(body[key], list) else [body[key]]
            scan_msgs = [{"role": "user", "content": t} for t in prompts]
            if isinstance(body.get("suffix"), str):
                scan_msgs.append({"role": "user", "content": body["suffix"]})
        ctx = ScanContext(
            tenant=p.tenant, route=route, system_prompt=system, canary=canary, request_id=trace.request_id
        )
        v = await self.pipeline.scan_input(scan_msgs, ctx)
        trace.guard.append({"stage": "input", **v.to_trace()})
        trace.policy_version = f"{v.policy_name}@{v.policy_version[:12]}"
        if v.blocked:
            raise APIError(400, _blocked_message(v), code="content_policy_violation")
        if v.action is Action.REDACT and v.messages is not None:
            if route == "chat":
                body["messages"] = v.messages
            else:
                texts = [m["content"] for m in v.messages]
                if isinstance(body.get("suffix"), str):
                    body["suffix"] = texts.pop()
                body[key] = texts if isinstance(body[key], list) else texts[0]
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


def _blocked_message(v: Any) -> str:
    """Why a request was blocked, without any of its text: the categories that fired, or, when the
    policy failed closed, what kept the text from being scanned. A size or type error is named (it
    says nothing of the content); a scanner's own exception is not echoed to the caller."""
    head = f"the request was blocked by content policy {v.policy_name!r}"
    if v.categories:
        return f"{head} ({', '.join(v.categories)})"
    unscanned = sorted(
        f"{where.removesuffix('.input')}: {why}" for where, why in v.errors.items() if where.endswith("input")
    )
    if unscanned:
        return f"{head}: the text was not scanned ({'; '.join(unscanned)})"
    return f"{head}: a scanner failed, and the policy fails closed"
