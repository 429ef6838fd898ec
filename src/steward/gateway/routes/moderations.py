"""`POST /v1/moderations` in OpenAI's format, answered by Steward's guards.

OpenAI's 13 categories are mapped from Steward's categories; the mapping is fixed and documented
here rather than learned, so a score always traces back to one detector:

* `harassment`, `hate` ← toxicity (the Davidson hate/offensive data covers both);
  their `/threatening` variants ← min(toxicity, harmful): abusive *and* harmful.
* `illicit` ← harmful with hazard nonviolent_crimes, privacy or intellectual_property (or no hazard);
  `illicit/violent` ← harmful with hazard violent_crimes or indiscriminate_weapons.
* `violence` ← harmful with hazard violent_crimes; `violence/graphic` ← no detector (always 0).
* `self-harm`, `self-harm/intent`, `self-harm/instructions` ← harmful with hazard suicide_self_harm.
* `sexual` ← harmful with hazard sex_related_crimes or sexual_content; `sexual/minors` (and `sexual`)
  ← child_sexual_exploitation.
* `harassment` ← harmful with hazard defamation too; `illicit` ← elections and specialized_advice
  (no OpenAI category names them; a harmful finding stays flagged rather than hidden).

A category is flagged when its score reaches the threshold of the Steward scanner it comes from.

The model is always `steward-guard` (what ran is what the response names). OpenAI's moderation model
names are accepted as aliases of it, so a client written for OpenAI works unchanged; any other name is
a 404 like an unknown model on the inference routes. A key with a model allow-list may moderate only
when the list names `steward-guard`.

The key's and tenant's limits apply as on the inference routes: one request, one concurrency slot
held while the scan runs, and the inputs' tokens (estimated at one per 3 UTF-8 bytes, the bound the
gateway uses for upstream prompts), reserved before the scan and settled after it (kept when a
result is given, refunded on an error); a refusal is the same 429 with the same rate-limit headers.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, StrictStr, field_validator
from starlette.responses import Response

from steward.gateway.errors import APIError
from steward.gateway.limits.base import ratelimit_headers
from steward.gateway.service import Gateway, estimate_text_tokens
from steward.gateway.trace import Trace

router = APIRouter()

MODEL = "steward-guard"
OPENAI_MODERATION_MODELS = ("omni-moderation-", "text-moderation-")

OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_HAZARD_TARGETS = {
    "violent_crimes": ("illicit/violent", "violence"),
    "indiscriminate_weapons": ("illicit/violent",),
    "nonviolent_crimes": ("illicit",),
    "privacy": ("illicit",),
    "intellectual_property": ("illicit",),
    "suicide_self_harm": ("self-harm", "self-harm/intent", "self-harm/instructions"),
    "sex_related_crimes": ("sexual",),
    "child_sexual_exploitation": ("sexual/minors", "sexual"),
    "sexual_content": ("sexual",),
    "hate": ("hate",),
    "defamation": ("harassment",),
    # No OpenAI category names these; `illicit` keeps a harmful finding flagged rather than hidden.
    "elections": ("illicit",),
    "specialized_advice": ("illicit",),
}


MAX_INPUTS = 256


class ModerationRequest(BaseModel):
    """OpenAI's three input forms: a string; a list of strings (one result each); a list of
    content parts (`{"type": "text", "text": ...}`; one input, one result, its text parts read
    together). Image parts are refused by name: this gateway's detectors read text only, and a
    result for an image nobody looked at would say "clean" with nothing behind it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    input: Any
    model: StrictStr | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> str | list[str]:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(
                "must be a string, a list of strings, or a list of content parts "
                f'({{"type": "text", "text": ...}}), not {_json_type(value)}'
            )
        if not value:
            raise ValueError("the list is empty; give at least one input")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request; got {len(value)}")
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, dict) for v in value):
            return [_content_parts_text(value)]
        raise ValueError("a list must hold only strings or only content parts (objects), not a mix")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _content_parts_text(parts: list[dict[str, Any]]) -> str:
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"content part {i}: `text` must be a string")
            if set(part) - {"type", "text"}:
                raise ValueError(f"content part {i}: unknown fields {sorted(set(part) - {'type', 'text'})}")
            texts.append(text)
        elif kind == "image_url":
            raise ValueError(
                f"content part {i}: image input is not supported; this gateway moderates text only"
            )
        else:
            raise ValueError(f'content part {i}: unknown type {kind!r} (use "text")')
    return "\n".join(texts)


def map_verdict(v: Any) -> dict[str, Any]:
    """One OpenAI moderation result from a Steward verdict."""
    scores = {c: 0.0 for c in OPENAI_CATEGORIES}
    flags = {c: False for c in OPENAI_CATEGORIES}
    tox = float(v.scores.get("toxicity", 0.0))
    harm = float(v.scores.get("harmful", 0.0))
    tox_t = float(v.thresholds.get("toxicity", 0.5))
    harm_t = float(v.thresholds.get("harmful", 0.5))
    for c in ("harassment", "hate"):
        scores[c], flags[c] = tox, tox >= tox_t
    both = min(tox, harm)
    for c in ("harassment/threatening", "hate/threatening"):
        scores[c], flags[c] = both, tox >= tox_t and harm >= harm_t
    hazards = {f.subtype for f in v.findings if f.category == "harmful" and f.subtype}
    targets: set[str] = set()
    for h in hazards or {"nonviolent_crimes"}:
        targets.update(_HAZARD_TARGETS.get(h, ("illicit",)))
    for c in targets:
        scores[c] = max(scores[c], harm)
        flags[c] = flags[c] or harm >= harm_t
    return {
        "flagged": any(flags.values()),
        "categories": flags,
        "category_scores": {c: round(s, 6) for c, s in scores.items()},
        "category_applied_input_types": {c: ["text"] for c in OPENAI_CATEGORIES},
    }


@router.post("/v1/moderations")
async def moderations(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    state = request.scope.get("state", {})
    trace = Trace(request_id=state.get("request_id", ""), route="/v1/moderations")

    async def work() -> tuple[int, Any, dict[str, str]]:
        p = await gw.principal(request, trace)
        if p.role == "auditor":
            raise APIError(403, "auditor keys may not call inference routes", code="role_not_allowed")
        req: ModerationRequest = gw.parse(ModerationRequest, await request.body())
        name = req.model
        if name is not None and name != MODEL and not name.startswith(OPENAI_MODERATION_MODELS):
            raise APIError(
                404,
                f"the moderation model {name!r} does not exist (this gateway moderates with {MODEL!r})",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        if not p.may_use(MODEL):
            raise APIError(
                403, f"this key may not use the model {MODEL!r}", param="model", code="model_not_allowed"
            )
        if gw.guard is None:
            raise APIError(404, "guards are disabled on this gateway", code="guards_disabled")
        from steward.guard import ScanContext

        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        tokens = float(estimate_text_tokens(texts))
        res = await gw.reserve(gw.limits_for(p), {"requests": 1.0, "tokens": tokens, "concurrent": 1.0})
        headers = ratelimit_headers(res.statuses) if res is not None else {}
        trace.limits = {"reserved_tokens": tokens} if res is not None else {}
        used = 0.0
        try:
            ctxs = [
                ScanContext(tenant=p.tenant, route="moderations", request_id=trace.request_id) for _ in texts
            ]
            gw.guard.bind(p)
            verdicts = await asyncio.to_thread(gw.guard.pipeline.scan_texts, texts, ctxs, "input")
            for v in verdicts:
                trace.guard.append({"stage": "moderation", **v.to_trace()})
            trace.model = MODEL
            trace.policy_version = f"{verdicts[0].policy_name}@{verdicts[0].policy_version[:12]}"
            _refuse_unscanned(verdicts)
            body = {
                "id": "modr-" + secrets.token_hex(12),
                "model": MODEL,
                "results": [map_verdict(v) for v in verdicts],
            }
            used = tokens
        finally:
            await gw.settle(res, {"tokens": used})
        return 200, body, headers

    return await gw.traced(trace, work)


def _refuse_unscanned(verdicts: list[Any]) -> None:
    """A moderation result says what the detectors found; for a text they did not read it would say
    "clean" with nothing behind it. So an input over the scan limit is a 400 naming it, and a
    scanner failure a 503; the policy's `fail_closed` does not apply here, since nothing is let
    through either way, only a verdict would be invented."""
    for i, v in enumerate(verdicts):
        if "input" in v.errors:
            raise APIError(400, f"input[{i}]: {v.errors['input']}", param="input", code="input_too_long")
    for i, v in enumerate(verdicts):
        if v.errors:
            raise APIError(
                503,
                f"input[{i}] could not be scanned (failed: {', '.join(sorted(v.errors))}); no result is "
                "given for text the detectors did not read",
                code="scanner_unavailable",
            )
        if not v.scanned:
            raise APIError(
                400,
                f"content policy {v.policy_name!r} runs no input scanners, so there is nothing to "
                "moderate with",
                code="no_scanners",
            )
