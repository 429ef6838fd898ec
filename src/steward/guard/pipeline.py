"""The policy engine: run a policy's scanners over a request or an answer and decide.

`Pipeline` is what the gateway calls. For each text it normalises once, runs one shared encoder pass
for all classifier scanners (batched across every text of the request, or of a whole JSONL file),
runs the pattern scanners, sets each finding's threshold and action from the policy, and returns a
`Verdict` that carries the findings, the action, the policy version and per-scanner latency.

Failure is explicit: a scanner that raises is recorded in `Verdict.errors`, and unless the policy (or
that scanner's entry) says `fail_closed: false`, the request is blocked. Nothing is ever reported as
scanned that was not.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .base import Registry, Scanner, default_registry
from .classifier import ClassifierScanner
from .leak import STREAM_STATE_KEY
from .normalize import MAX_DECODE_DEPTH, Document, normalise
from .pii import QUASI
from .policy import Policy, PolicySet, ScannerSpec, load_policy_set
from .redact import RedactionMode, Vault, placeholder_hold, redact_many
from .types import Action, Finding, ScanContext, ScannerError, Span, Verdict, strongest

__all__ = ["MAX_SCAN_CHARS", "Pipeline", "StreamChunk", "StreamGuard", "content_text"]

MAX_SCAN_CHARS = 200_000  # longer texts are refused (fail-closed) rather than partly scanned
# What a system turn is scanned for. Operator-written instructions look like instructions by design
# ("if a user asks you to ignore previous instructions, refuse"), so every scanner of
# prompt_injection or jailbreak (the classifier, the rules, the context probe) would block the
# operator's own bot; harmful and toxicity would fire on the content rules a system prompt states.
_SYSTEM_ROLE_CATEGORIES = frozenset({"pii", "secrets"})
# The most a stream holds back to keep a run of non-space characters or an entity to redact whole,
# and how far before the usual window start a window may begin (see StreamGuard).
_HOLD_RUN = 4096

Direction = Literal["input", "output"]


@dataclass(slots=True)
class _Item:
    text: str
    ctx: ScanContext
    doc: Document | None = None
    findings: list[Finding] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    modes: dict[int, RedactionMode] = field(default_factory=dict)
    cache: dict[str, Any] | None = None  # seeded into the document's cache (a stream's state)


class Pipeline:
    """Guards for one policy set. Thread-safe; scanners are built once and shared."""

    def __init__(
        self,
        policies: PolicySet | str | Path | dict[str, Any] | None = None,
        registry: Registry | None = None,
        *,
        hash_key: bytes = b"steward",
        max_chars: int = MAX_SCAN_CHARS,
    ) -> None:
        self.registry = registry or default_registry()
        self.policies = (
            policies if isinstance(policies, PolicySet) else load_policy_set(policies, self.registry)
        )
        self.hash_key = hash_key
        self.max_chars = max_chars
        self._scanners: dict[tuple[str, str], Scanner] = {}

    # -- helpers --------------------------------------------------------------------------------
    def policy_for(self, ctx: ScanContext) -> tuple[str, Policy]:
        return self.policies.select(ctx.tenant, ctx.route)

    def _scanner(self, spec: ScannerSpec) -> Scanner:
        key = (spec.scanner, repr(sorted(spec.options.items())))
        sc = self._scanners.get(key)
        if sc is None:
            sc = self._scanners[key] = self.registry.create(spec.scanner, spec.options)
        return sc

    def _threshold(self, spec: ScannerSpec, scanner: Scanner) -> float:
        if spec.threshold is not None:
            return spec.threshold
        if isinstance(scanner, ClassifierScanner):
            return scanner.default_threshold()
        return 0.5

    @staticmethod
    def _action(spec: ScannerSpec, f: Finding) -> Action:
        if not f.triggered:
            return Action.ALLOW
        if f.entity in spec.entity_actions:
            return spec.entity_actions[f.entity]
        if f.subtype == QUASI:
            return spec.quasi_action
        return spec.action

    # -- core (synchronous) -----------------------------------------------------------------------
    def scan_texts(
        self, texts: Sequence[str], ctxs: Sequence[ScanContext], direction: Direction = "input"
    ) -> list[Verdict]:
        """Scan many texts (each with its own context/policy) with one batched encoder pass."""
        if len(texts) != len(ctxs):
            raise ValueError("scan_texts needs one context per text")
        items = [_Item(t, c) for t, c in zip(texts, ctxs, strict=True)]
        return self._run(items, direction, [None] * len(items))

    def scan_text(self, text: str, ctx: ScanContext | None = None, direction: Direction = "input") -> Verdict:
        return self.scan_texts([text], [ctx or ScanContext()], direction)[0]

    def _specs(self, policy: Policy, direction: Direction, ctx: ScanContext) -> list[ScannerSpec]:
        specs = policy.input if direction == "input" else policy.output
        if direction == "input" and (ctx.role == "system" or ctx.route == "embeddings"):
            # Text to embed is not read as instructions by any model: what matters is what leaves
            # (PII, secrets), not whether it quotes an attack (a corpus of security papers would).
            specs = [s for s in specs if self._category(s) in (*_SYSTEM_ROLE_CATEGORIES, None)]
        return specs

    def _category(self, spec: ScannerSpec) -> str | None:
        """The spec's scanner category; None where the scanner cannot be built (that error is
        recorded when the spec runs, so it is kept, not dropped)."""
        try:
            return str(self._scanner(spec).category)
        except Exception:
            return None

    def _run(self, items: list[_Item], direction: Direction, vaults: list[Vault | None]) -> list[Verdict]:
        latency: list[dict[str, float]] = [{} for _ in items]
        chosen = [self.policy_for(it.ctx) for it in items]
        t = time.perf_counter()
        for it in items:
            if not isinstance(it.text, str):
                it.errors["input"] = f"text must be a string, got {type(it.text).__name__}"
            elif len(it.text) > self.max_chars:
                it.errors["input"] = (
                    f"text of {len(it.text)} characters exceeds the scan limit of {self.max_chars}"
                )
            else:
                it.doc = normalise(it.text)
                if it.cache:
                    it.doc.cache.update(it.cache)
                if it.doc.undecoded:
                    # Scanned as far as it decodes, but not reported as scanned: a payload may sit
                    # under the last layer read (fail-closed policies block).
                    it.errors["decode"] = (
                        f"{it.doc.undecoded} encoded run(s) nested deeper than {MAX_DECODE_DEPTH} "
                        "layers were not decoded"
                    )
        per = (time.perf_counter() - t) * 1000 / max(1, len(items))
        for lat in latency:
            lat["normalise"] = per
        # One encoder pass per head for every document whose policy runs a classifier: the four
        # classifier scanners of a policy share one head, so they read one set of window scores.
        # Grouped by the head directory's resolved path (not object identity), so two specs naming
        # the same head never run the encoder twice.
        groups: dict[str, tuple[ClassifierScanner, list[int]]] = {}
        for k, (it, (_, pol)) in enumerate(zip(items, chosen, strict=True)):
            if it.doc is None:
                continue
            seen: set[str] = set()
            for spec in self._specs(pol, direction, it.ctx):
                cand = self._scanner(spec)
                if isinstance(cand, ClassifierScanner) and cand.head_key not in seen:
                    seen.add(cand.head_key)
                    groups.setdefault(cand.head_key, (cand, []))[1].append(k)
        for clf, idx in groups.values():
            t = time.perf_counter()
            try:
                clf.model.score_documents([d for k in idx if (d := items[k].doc) is not None])
            except Exception as exc:  # the encoder failing must not crash the caller
                for k in idx:
                    items[k].errors["encoder"] = f"{type(exc).__name__}: {exc}"
            per = (time.perf_counter() - t) * 1000 / len(idx)
            for k in idx:
                latency[k]["encoder"] = per
        verdicts: list[Verdict] = []
        for it, (name, pol), lat, vault in zip(items, chosen, latency, vaults, strict=True):
            verdicts.append(self._decide(it, name, pol, direction, lat, vault))
        return verdicts

    def _decide(
        self,
        it: _Item,
        name: str,
        pol: Policy,
        direction: Direction,
        lat: dict[str, float],
        vault: Vault | None,
    ) -> Verdict:
        specs = self._specs(pol, direction, it.ctx)
        scores: dict[str, float] = {}
        thresholds: dict[str, float] = {}
        fail_block = False
        if "input" in it.errors or "decode" in it.errors:
            fail_block = pol.fail_closed
        for spec in specs:
            if it.doc is None:
                break
            t = time.perf_counter()
            try:
                scanner = self._scanner(spec)
                threshold = self._threshold(spec, scanner)
                if "encoder" in it.errors and isinstance(scanner, ClassifierScanner):
                    raise ScannerError(it.errors["encoder"])
                found = scanner.scan(it.doc, it.ctx)
            except Exception as exc:
                it.errors[spec.scanner] = f"{type(exc).__name__}: {exc}"
                fail = spec.fail_closed if spec.fail_closed is not None else pol.fail_closed
                fail_block = fail_block or fail
                lat[spec.scanner] = (time.perf_counter() - t) * 1000
                continue
            lat[spec.scanner] = lat.get(spec.scanner, 0.0) + (time.perf_counter() - t) * 1000
            cat = scanner.category
            thresholds[cat] = threshold
            scores.setdefault(cat, 0.0)
            for f in found:
                f.threshold = threshold
                f.action = self._action(spec, f)
                scores[cat] = max(scores[cat], f.score)
                it.findings.append(f)
                it.modes[id(f)] = spec.redaction
        actions = [f.action for f in it.findings]
        action = Action.BLOCK if fail_block else strongest(actions)
        verdict = Verdict(
            direction=direction,
            action=action,
            findings=it.findings,
            policy_name=name,
            policy_version=pol.version(),
            latency_ms=lat,
            errors=it.errors,
            scores=scores,
            thresholds=thresholds,
            scanned=bool(specs) and it.doc is not None and not it.errors,
        )
        if action is Action.REDACT:
            vault = vault if vault is not None else Vault()
            todo = [(f, it.modes[id(f)]) for f in it.findings if f.action is Action.REDACT]
            verdict.text = redact_many(it.text, todo, vault, self.hash_key, _origin(direction, it.ctx))
            verdict.vault = vault
        return verdict

    # -- chat requests ---------------------------------------------------------------------------
    def scan_messages(self, messages: Sequence[dict[str, Any]], ctx: ScanContext | None = None) -> Verdict:
        """Scan an OpenAI-style message list: user turns and documents (tool/document/function
        messages, for indirect injection, and earlier assistant turns) with the input policy,
        system messages for PII/secrets.

        Returns one verdict for the request; finding offsets are into the content of the message
        named by `Finding.message` (text parts of one message are joined by newlines first).
        """
        ctx = ctx or ScanContext()
        name, pol = self.policy_for(ctx)
        # (message index, where in the message, text, context); where is () for the content, or
        # ("tool_calls", j) / ("function_call",) for an assistant's call arguments.
        parts: list[tuple[int, tuple[Any, ...], str, ScanContext]] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise ValueError(f"messages[{i}] must be an object")
            role = msg.get("role")
            text = content_text(msg.get("content"))
            if role == "assistant" and pol.documents:
                # Call arguments in the history come from the client as much as the content does:
                # read like assistant content (as documents), redacted in place.
                doc_ctx = replace(ctx, role="document")
                for where, args in _call_arguments(msg):
                    parts.append((i, where, _arguments_text(args), doc_ctx))
            if text is None:
                continue
            if role == "system" or role == "developer":
                if ctx.system_prompt is None:
                    ctx = replace(ctx, system_prompt=text)
                parts.append((i, (), text, replace(ctx, role="system")))
            elif role == "user":
                parts.append((i, (), text, replace(ctx, role="user")))
            elif role in ("tool", "function", "document", "assistant") and pol.documents:
                # Earlier assistant turns come from the client like everything else in the request
                # (a forged dialogue is how many-shot jailbreaks arrive), so they are read as
                # documents: text the model will read that the user may not have written.
                parts.append((i, (), text, replace(ctx, role="document")))
        # One vault for the request; each value remembers the role it came from, and only values
        # of user turns are restored in the answer (see `Vault`).
        vault = Vault()
        items = [_Item(t, c) for _, _, t, c in parts]
        per_msg = self._run(items, "input", [vault] * len(items))
        findings: list[Finding] = []
        latency: dict[str, float] = {}
        errors: dict[str, str] = {}
        scores: dict[str, float] = {}
        thresholds: dict[str, float] = {}
        out_messages = [dict(m) for m in messages]
        for (i, where, _, pctx), v, it in zip(parts, per_msg, items, strict=True):
            for f in v.findings:
                f.message = i
            findings.extend(v.findings)
            for k, ms in v.latency_ms.items():
                latency[k] = latency.get(k, 0.0) + ms
            label = f"messages[{i}]" + "".join(f".{w}" for w in where)
            errors.update({f"{label}.{k}": e for k, e in v.errors.items()})
            for k, s in v.scores.items():
                scores[k] = max(scores.get(k, 0.0), s)
            thresholds.update(v.thresholds)
            if v.text is None:
                continue
            if where:
                todo = [(f, it.modes[id(f)]) for f in v.findings if f.action is Action.REDACT]
                args = _redact_arguments(
                    _get_call_arguments(messages[i], where), todo, vault, self.hash_key, pctx.role
                )
                _set_call_arguments(out_messages, i, where, args)
                continue
            content = messages[i].get("content")
            if isinstance(content, list):
                todo = [(f, it.modes[id(f)]) for f in v.findings if f.action is Action.REDACT]
                out_messages[i]["content"] = _redact_parts(content, todo, vault, self.hash_key, pctx.role)
            else:
                out_messages[i]["content"] = v.text
        action = strongest([v.action for v in per_msg])
        return Verdict(
            direction="input",
            action=action,
            findings=findings,
            policy_name=name,
            policy_version=pol.version(),
            latency_ms=latency,
            errors=errors,
            scores=scores,
            thresholds=thresholds,
            scanned=bool(parts) and all(v.scanned for v in per_msg),
            messages=out_messages if action is Action.REDACT else None,
            vault=vault if len(vault) else None,
        )

    def finish_output(
        self,
        text: str,
        ctx: ScanContext | None = None,
        vault: Vault | None = None,
        *,
        leak_state: dict[Any, Any] | None = None,
        escape: Callable[[str], str] | None = None,
    ) -> Verdict:
        """Scan an answer; redact per policy, then restore the request's pseudonyms for the caller
        (only values of the caller's own user turns: see `Vault`), each value passed through
        `escape` when given (JSON-escaping for tool-call arguments). Parts of one answer scanned
        separately (content, tool-call arguments) may pass one `leak_state` dict, so their
        system-prompt overlap adds up."""
        ctx = ctx or ScanContext()
        _, pol = self.policy_for(ctx)
        # Pseudonyms of the answer's own PII go into the request's vault (so their tokens never
        # collide with the request's), marked as output: never restored.
        cache = {STREAM_STATE_KEY: leak_state} if leak_state is not None else None
        verdict = self._run([_Item(text, ctx, cache=cache)], "output", [vault])[0]
        if verdict.action is not Action.BLOCK:
            shown = verdict.text if verdict.text is not None else text
            if vault is not None and pol.restore_pseudonyms:
                shown = vault.restore(shown, escape=escape)
            verdict.text = shown
        return verdict

    # -- async API for the gateway ----------------------------------------------------------------
    async def scan_input(self, messages: Sequence[dict[str, Any]], ctx: ScanContext | None = None) -> Verdict:
        """`scan_messages` off the event loop (the encoder is CPU-bound)."""
        return await asyncio.to_thread(self.scan_messages, messages, ctx)

    async def scan_output(
        self,
        text: str,
        ctx: ScanContext | None = None,
        vault: Vault | None = None,
        *,
        leak_state: dict[Any, Any] | None = None,
        escape: Callable[[str], str] | None = None,
    ) -> Verdict:
        """`finish_output` off the event loop; `verdict.text` is what the caller may see."""
        return await asyncio.to_thread(
            functools.partial(self.finish_output, text, ctx, vault, leak_state=leak_state, escape=escape)
        )

    def stream(
        self,
        ctx: ScanContext | None = None,
        vault: Vault | None = None,
        *,
        leak_state: dict[Any, Any] | None = None,
        **kw: int,
    ) -> StreamGuard:
        """A `StreamGuard` for one streamed text. Guards of one answer's parts (content, tool-call
        arguments) may pass one `leak_state` dict, so their system-prompt overlap adds up."""
        return StreamGuard(self, ctx or ScanContext(), vault, leak_state=leak_state, **kw)


def content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(t for t in texts if isinstance(t, str)) if texts else None
    return None


def _origin(direction: Direction, ctx: ScanContext) -> str:
    """The vault origin of a value redacted from a text: the turn's role, or "output"."""
    return "output" if direction == "output" else ctx.role


def _call_arguments(msg: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(where, arguments) of each call an assistant message makes: `tool_calls[j].function` and the
    legacy `function_call`."""
    out: list[tuple[tuple[Any, ...], str]] = []
    calls = msg.get("tool_calls")
    if isinstance(calls, list):
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str) and fn["arguments"]:
                out.append((("tool_calls", j), fn["arguments"]))
    fc = msg.get("function_call")
    if isinstance(fc, dict) and isinstance(fc.get("arguments"), str) and fc["arguments"]:
        out.append((("function_call",), fc["arguments"]))
    return out


def _get_call_arguments(msg: dict[str, Any], where: tuple[Any, ...]) -> str:
    call = msg["tool_calls"][where[1]]["function"] if where[0] == "tool_calls" else msg["function_call"]
    return str(call["arguments"])


def _is_number(obj: Any) -> bool:
    return isinstance(obj, int | float) and not isinstance(obj, bool)


def _json_strings(obj: Any) -> list[str]:
    """Every string of a JSON value, keys included, and every number as its JSON text (a card or
    phone number need not be quoted), in document order."""
    if isinstance(obj, str):
        return [obj]
    if _is_number(obj):
        return [json.dumps(obj)]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (k, *_json_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _json_strings(v)]
    return []


def _json_replace(obj: Any, new: list[str]) -> Any:
    """`obj` with its strings and numbers (in `_json_strings` order) taken from `new`, front first;
    a number the redaction changed becomes the redacted string."""
    if isinstance(obj, str):
        return new.pop(0)
    if _is_number(obj):
        text = new.pop(0)
        return obj if text == json.dumps(obj) else text
    if isinstance(obj, dict):
        out = {}
        for v in obj.values():
            key = new.pop(0)
            out[key] = _json_replace(v, new)
        return out
    if isinstance(obj, list):
        return [_json_replace(v, new) for v in obj]
    return obj


def _json_arguments(args: str) -> Any:
    """The parsed arguments when they are JSON with at least one string or number, else None."""
    try:
        obj = json.loads(args)
    except ValueError:
        return None
    return obj if _json_strings(obj) else None


def _arguments_text(args: str) -> str:
    """What is scanned of call arguments: JSON's strings decoded and its numbers, one per line (an
    instruction read as a quoted JSON string would score lower than the model reads it), else the
    raw text."""
    obj = _json_arguments(args)
    return args if obj is None else "\n".join(_json_strings(obj))


def _set_call_arguments(messages: list[dict[str, Any]], i: int, where: tuple[Any, ...], args: str) -> None:
    """Write redacted arguments into a copy of the message's call (the caller's stays untouched)."""
    msg = messages[i]
    if where[0] == "tool_calls":
        calls = list(msg["tool_calls"])
        call = dict(calls[where[1]])
        call["function"] = {**call["function"], "arguments": args}
        calls[where[1]] = call
        msg["tool_calls"] = calls
    else:
        msg["function_call"] = {**msg["function_call"], "arguments": args}


def _redact_arguments(
    args: str, todo: list[tuple[Finding, RedactionMode]], vault: Vault, hash_key: bytes, origin: str
) -> str:
    """Arguments with the findings (offsets into `_arguments_text`) replaced. JSON arguments are
    redacted string by string and serialised again, so they stay valid JSON. Other text is redacted
    as it is, a span never ending inside a backslash escape."""
    obj = _json_arguments(args)
    if obj is not None:
        parts = [{"type": "text", "text": s} for s in _json_strings(obj)]
        new = [p["text"] for p in _redact_parts(parts, todo, vault, hash_key, origin)]
        return json.dumps(_json_replace(obj, new), ensure_ascii=False)
    fixed = []
    for f, mode in todo:
        spans = []
        for sp in f.spans:
            start, end = sp.start, sp.end
            if 0 < start < len(args) and _escaped(args, start):
                start -= 1
            while 0 < end < len(args) and (args[end - 1] == "\\" and not _escaped(args, end - 1)):
                end += 1
            spans.append(Span(start, end))
        fixed.append((replace(f, spans=spans), mode))
    return redact_many(args, fixed, vault, hash_key, origin)


def _escaped(text: str, i: int) -> bool:
    """Whether text[i] is escaped by an odd run of backslashes before it."""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def _redact_parts(
    content: list[Any],
    todo: list[tuple[Finding, RedactionMode]],
    vault: Vault,
    hash_key: bytes,
    origin: str = "user",
) -> list[Any]:
    """A content-parts message redacted part by part, so it keeps its shape: finding offsets are
    into the text parts joined by newlines (`content_text`), and every other part (an image, an
    audio clip) stays where it was."""
    out: list[Any] = []
    pos = 0
    for part in content:
        text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
        if not isinstance(text, str):
            out.append(part)
            continue
        a, b = pos, pos + len(text)
        mine = []
        for f, mode in todo:
            spans = [
                Span(max(sp.start, a) - a, min(sp.end, b) - a)
                for sp in f.spans
                if sp.start < b and sp.end > a
            ]
            if spans:
                mine.append((replace(f, spans=spans), mode))
        out.append({**part, "text": redact_many(text, mine, vault, hash_key, origin)})
        pos = b + 1
    return out


@dataclass(slots=True)
class StreamChunk:
    """What the gateway may send now. `cut` means stop the stream with `finish_reason`."""

    text: str
    cut: bool = False
    finish_reason: str | None = None
    verdict: Verdict | None = None


class StreamGuard:
    """Scan a streamed answer in overlapping windows; release only text that has been scanned.

    Text is held back until a window covering it has been scanned, and the last `overlap` characters
    of each window are held until the next window re-scans them with more context, so an entity
    split across two deltas is still seen whole. Two more rules keep an entity longer than the
    overlap whole: a release never ends inside a run of non-space characters (a token, a key line,
    a pseudonym the vault must restore), nor inside an entity to redact; and every window starts at
    or before the first character not yet released. So a PEM block whose "-----BEGIN" line only the
    first window saw is held, and the next window reads it again from that line, instead of starting
    inside the key body, where no pattern can recognise it. On a blocking finding the stream is cut
    with `finish_reason="content_filter"` and nothing after the last safe point is released.
    `scanned_chars == total_chars` is the only condition under which `report()` says scanned.

    Evidence of a system-prompt leak is kept for the whole stream (`leak.STREAM_STATE_KEY`): every
    window adds the prompt n-grams it repeats, and is judged on all of them, so a prompt leaked in
    pieces over many windows is cut as the same answer non-streamed would be blocked. A release
    never splits a placeholder the vault may restore (`< PERSON_1 >`), either.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        ctx: ScanContext,
        vault: Vault | None = None,
        *,
        window: int = 1024,
        overlap: int = 256,
        leak_state: dict[Any, Any] | None = None,
    ) -> None:
        if not 0 < overlap < window:
            raise ValueError(f"stream overlap must be in (0, window); got overlap={overlap}, window={window}")
        self.pipeline = pipeline
        self.ctx = ctx
        self.vault = vault
        # Pseudonyms the output policy writes when the caller gave no vault: one vault for the whole
        # stream, so two releases never both number an address <EMAIL_ADDRESS_1>.
        self._own_vault = Vault()
        self.window = window
        self.overlap = overlap
        self.buffer = ""
        self.emitted = 0  # characters of `buffer` released to the client
        self.scanned_to = 0  # characters of `buffer` covered by a completed window scan
        self.cut = False
        self.verdicts: list[Verdict] = []
        self._leak_state: dict[Any, Any] = leak_state if leak_state is not None else {}
        self._redactions: dict[tuple[int, int, str], tuple[Finding, RedactionMode]] = {}
        _, pol = pipeline.policy_for(ctx)
        self._restore = pol.restore_pseudonyms
        self._modes = {s.scanner: s.redaction for s in pol.output}

    def _scan_window(self, end: int) -> Verdict:
        # From the first unreleased character, but never more than `_HOLD_RUN` characters before
        # the usual start: what a stream may hold is bounded, and so is each window's cost.
        usual = max(0, self.scanned_to - self.overlap)
        start = max(min(usual, self.emitted), usual - _HOLD_RUN)
        item = _Item(self.buffer[start:end], self.ctx, cache={STREAM_STATE_KEY: self._leak_state})
        verdict = self.pipeline._run([item], "output", [None])[0]
        for f in verdict.findings:
            f.spans = [type(s)(s.start + start, s.end + start) for s in f.spans]
            if f.action is Action.REDACT:
                key = (f.start, f.end, f.entity)
                self._redactions[key] = (f, self._modes.get(f.scanner, "mask"))
        self.verdicts.append(verdict)
        self.scanned_to = end
        return verdict

    def _release(self, upto: int) -> str:
        # Never split a redacted entity, or a run of non-space characters, across two releases
        # (up to `_HOLD_RUN` characters back: a longer entity is released masked, in pieces).
        for f, _ in sorted(self._redactions.values(), key=lambda x: -x[0].start):
            if f.start < upto < f.end and upto - f.start <= _HOLD_RUN:
                upto = f.start
        upto = self._run_start(upto)
        if self.vault is not None and self._restore:
            upto = placeholder_hold(self.buffer, upto, self.emitted)
        upto = max(upto, self.emitted)
        piece_findings = []
        for f, mode in self._redactions.values():
            if f.end > self.emitted and f.start < upto:
                clipped = replace(
                    f, spans=[type(s)(s.start - self.emitted, s.end - self.emitted) for s in f.spans]
                )
                piece_findings.append((clipped, mode))
        piece = self.buffer[self.emitted : upto]
        vault = self.vault if self.vault is not None else self._own_vault
        out = redact_many(piece, piece_findings, vault, self.pipeline.hash_key, "output")
        if self.vault is not None and self._restore:
            out = self.vault.restore(out)
        self.emitted = upto
        # An entity wholly released can no longer hold or mask anything: drop it, so each release
        # looks at the few entities still open, not every one the stream ever had.
        self._redactions = {k: v for k, v in self._redactions.items() if v[0].end > upto}
        return out

    def _run_start(self, upto: int) -> int:
        """`upto`, or the start of the run of non-space characters it falls inside. A run longer
        than `_HOLD_RUN` is released anyway: holding a whitespace-free megabyte would re-scan it
        once per window."""
        buf = self.buffer
        if upto <= self.emitted or upto >= len(buf) or buf[upto - 1].isspace() or buf[upto].isspace():
            return upto
        s = upto
        while s > self.emitted and not buf[s - 1].isspace():
            s -= 1
            if upto - s > _HOLD_RUN:
                return upto
        return s

    def feed(self, delta: str) -> StreamChunk:
        """Add generated text; returns what may be sent now (possibly empty)."""
        if self.cut:
            return StreamChunk("", cut=True, finish_reason="content_filter")
        self.buffer += delta
        step = self.window - self.overlap
        text = ""
        while len(self.buffer) - self.scanned_to >= step:
            verdict = self._scan_window(self.scanned_to + step)
            if verdict.blocked:
                self.cut = True
                return StreamChunk(text, cut=True, finish_reason="content_filter", verdict=verdict)
            text += self._release(self.scanned_to - self.overlap)
        return StreamChunk(text)

    def finish(self) -> StreamChunk:
        """End of generation: scan what is left and release it (or cut)."""
        if self.cut:
            return StreamChunk("", cut=True, finish_reason="content_filter")
        if self.scanned_to < len(self.buffer) or not self.verdicts:
            verdict = self._scan_window(len(self.buffer))
            if verdict.blocked:
                self.cut = True
                return StreamChunk("", cut=True, finish_reason="content_filter", verdict=verdict)
        return StreamChunk(self._release(len(self.buffer)), finish_reason="stop")

    def report(self) -> dict[str, Any]:
        """For the trace: how much was scanned, in how many windows, and whether it was cut."""
        return {
            "scanned": self.scanned_to >= len(self.buffer) and all(v.scanned for v in self.verdicts),
            "scanned_chars": self.scanned_to,
            "total_chars": len(self.buffer),
            "released_chars": self.emitted,
            "windows": len(self.verdicts),
            "cut": self.cut,
            "window": self.window,
            "overlap": self.overlap,
            "findings": [f.to_dict() for v in self.verdicts for f in v.findings if f.triggered],
        }
