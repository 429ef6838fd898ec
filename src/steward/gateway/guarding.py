"""The guard stages of a request: input scan (with canary and redaction), output scan, stream scan.

The gateway holds one `steward.guard.Pipeline`. A tenant's policy comes from the policy file's
bindings, or from the tenant's `policy` field in the store (set by `PUT /admin/tenants/{id}`), which
is added as a binding the first time the tenant is seen. Every verdict goes into the trace; the
trace never holds matched text.
"""

from __future__ import annotations

import asyncio
import json
import re
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
    # steward.guard.Vault: the request's, even when the input had nothing to pseudonymise, so that
    # every pseudonym the output policy writes (in any field or choice) comes from one vault and
    # never takes a token another value already has.
    vault: Any


TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")
"""The text fields of a chat message (or stream delta) that the model writes, besides tool calls:
`reasoning_content` is what vLLM's and DeepSeek's reasoning parsers send, `reasoning` its newer name.
A completion choice has one, `text`."""
CALL_FIELDS = ("tool_calls", "function_call")  # `function_call`: the legacy form of one tool call
GENERATED = (*TEXT_FIELDS, *CALL_FIELDS)


CALL_META = ("id", "type", "index")
"""Keys of a tool call the server writes, not the model: never scanned, and in a stream each keeps
its first value (some servers repeat `type` in every delta)."""
JSON_KEYS = ("arguments",)
"""Keys whose value is JSON for a tool to parse: scanned decoded, and when given as an object
(several OpenAI-compatible servers do) scanned serialised and written back as an object."""
MAX_HELD_CALL_CHARS = 1 << 20
"""The most characters a stream's held tool calls (every string of them, per choice) may add up to
before they are scanned. A call is held whole until its choice ends, so without a bound one choice
could hold all the key's budget in memory and then merge and scan it at once; past the bound the
choice is cut with `content_filter` and the trace says why. 1 MiB of arguments is far beyond any
real tool call, and over the scanners' own size limit, which would fail the scan anyway."""

Slot = tuple[str, Any, Any]  # (field name for the trace, the dict or list holding it, its key there)


def _slots(holder: dict[str, Any], chat: bool) -> list[Slot]:
    """Every non-empty text the model wrote into `holder` (a message, a delta, or a completion
    choice), as (field name for the trace, the dict or list holding it, its key there): what the
    output policy scans and redacts in place, whatever shape the answer took. Content parts give
    every string they hold but their `type` (`text`, `refusal`, ...); a tool call gives every string
    under it but its `id`/`type`/`index`, whatever its type (`function`, `custom`, one not known
    yet), and `arguments` given as an object as one slot (scanned as JSON)."""
    if not chat:
        text = holder.get("text")
        return [("text", holder, "text")] if isinstance(text, str) and text else []
    out: list[Slot] = []
    for f in TEXT_FIELDS:
        value = holder.get(f)
        if isinstance(value, str) and value:
            out.append((f, holder, f))
        elif isinstance(value, list):  # content given as parts: every string of each part
            for k, part in enumerate(value):
                if not isinstance(part, dict):
                    _leaves(part, f"{f}[{k}]", value, k, out)
                    continue
                for pk, pv in part.items():
                    if pk != "type":
                        _leaves(pv, f"{f}[{k}]" if pk == "text" else f"{f}[{k}].{pk}", part, pk, out)
    calls = holder.get("tool_calls")
    for j, tc in enumerate(calls if isinstance(calls, list) else []):
        if not isinstance(tc, dict):
            _leaves(tc, f"tool_calls[{j}]", calls, j, out)
            continue
        for k, v in tc.items():
            if k not in CALL_META:
                _leaves(v, f"tool_calls[{j}].{k}", tc, k, out)
    if "function_call" in holder:
        _leaves(holder["function_call"], "function_call", holder, "function_call", out)
    return out


def _leaves(value: Any, where: str, box: Any, key: Any, out: list[Slot]) -> None:
    """The slots of every non-empty string under `value` (`box[key]`); an object or list under a
    JSON key is one slot."""
    if isinstance(value, str):
        if value:
            out.append((where, box, key))
    elif isinstance(value, (dict, list)) and key in JSON_KEYS:
        out.append((where, box, key))
    elif isinstance(value, dict):
        for k, v in value.items():
            _leaves(v, f"{where}.{k}", value, k, out)
    elif isinstance(value, list):
        for n, v in enumerate(value):
            _leaves(v, f"{where}[{n}]", value, n, out)


def _slot_text(value: Any) -> str:
    """A slot's text: the string, or an object given for JSON serialised."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def generated_texts(choice: dict[str, Any]) -> list[str]:
    """The texts a choice of an answer or of a stream chunk carries from the model (every field,
    tool-call arguments included): what a stream's token count is estimated from."""
    chat = "delta" in choice or "message" in choice
    holder = (choice.get("delta") if "delta" in choice else choice.get("message")) if chat else choice
    return [_slot_text(box[key]) for _, box, key in _slots(holder, chat)] if isinstance(holder, dict) else []


def merge_call(acc: dict[str, Any], piece: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """Add one streamed tool-call delta to the call assembled so far: strings at any depth
    (`function.arguments`, `custom.input`, ...) come in pieces and are concatenated; nested objects
    are merged; the call's own `id`/`type`/`index`, and any other value, keep their first value.
    (A whole stream's pieces are better merged at once with `merge_pieces`.)"""
    for k, v in piece.items():
        cur = acc.get(k)
        if isinstance(v, dict) and (cur is None or isinstance(cur, dict)):
            if cur is None:
                cur = acc[k] = {}
            merge_call(cur, v, top=False)
        elif cur is None:  # a key not given yet, or given as null
            acc[k] = v
        elif isinstance(v, str) and isinstance(cur, str) and not (top and k in CALL_META):
            acc[k] = cur + v
    return acc


class _Pieces(list[str]):
    """A string being assembled from a stream's pieces, joined once at the end."""


def merge_pieces(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed tool call's deltas as one call, as `merge_call` one after the other would make
    it, in linear time: every string's pieces are gathered in a list and joined once."""
    acc: dict[str, Any] = {}
    for piece in pieces:
        _gather(acc, piece, top=True)
    merged: dict[str, Any] = _joined(acc)
    return merged


def _gather(acc: dict[str, Any], piece: dict[str, Any], top: bool) -> None:
    for k, v in piece.items():
        cur = acc.get(k)
        if isinstance(v, dict) and (cur is None or isinstance(cur, dict)):
            if cur is None:
                cur = acc[k] = {}
            _gather(cur, v, top=False)
        elif cur is None:  # a key not given yet, or given as null
            acc[k] = _Pieces([v]) if isinstance(v, str) else v
        elif isinstance(v, str) and isinstance(cur, _Pieces) and not (top and k in CALL_META):
            cur.append(v)


def _joined(value: Any) -> Any:
    if isinstance(value, _Pieces):
        return "".join(value)
    if isinstance(value, dict):
        return {k: _joined(v) for k, v in value.items()}
    return value


def _chars(value: Any) -> int:
    """How many characters of strings `value` holds, at any depth."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def merge_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Several chunks' logprobs as one: chat's `content`/`refusal` lists, or a completion's parallel
    `tokens`/`token_logprobs`/`top_logprobs`/`text_offset` lists, concatenated in order (extended in
    place, in linear time: a long held tool call can have tens of thousands of parts)."""
    if not parts:
        return None
    out: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, list):
                if k not in lists:
                    lists[k] = out[k] = []
                lists[k].extend(v)
            elif k not in out:
                out[k] = v
    return out


def restore_json(text: str, vault: Any) -> str:
    """Put the caller's values back for the pseudonyms in a JSON text (tool-call arguments), so
    that a value holding a quote or a backslash cannot break the arguments the client's tool
    parses. Valid JSON is restored string by string with `Vault.restore` (which decides which
    values come back and which spellings of a token it accepts) and written out again only if
    something changed; text that is not JSON gets each exact token replaced by its value,
    JSON-escaped."""
    if vault is None or not len(vault):
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        pattern = re.compile("|".join(re.escape(t) for t in sorted(vault.tokens(), key=len, reverse=True)))
        return pattern.sub(lambda m: json.dumps(vault.restore(m.group()), ensure_ascii=False)[1:-1], text)
    restored = _restore_strings(parsed, vault)
    return text if restored == parsed else json.dumps(restored, ensure_ascii=False)


def _restore_strings(value: Any, vault: Any) -> Any:
    if isinstance(value, str):
        return vault.restore(value)
    if isinstance(value, list):
        return [_restore_strings(v, vault) for v in value]
    if isinstance(value, dict):
        return {_restore_strings(k, vault): _restore_strings(v, vault) for k, v in value.items()}
    return value


def request_vault() -> Any:
    """An empty vault for a request whose input had nothing to pseudonymise (see `InputResult`):
    every pseudonym the output policy writes for the request then comes from this one vault."""
    from steward.guard import Vault

    return Vault()


def json_escape(value: str) -> str:
    """`value` as it goes between the quotes of a JSON string."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@dataclass
class FieldScan:
    """One generated field through the output policy."""

    report: dict[str, Any]  # the verdict, for the trace
    text: str | None  # what the client may see; None when the field cuts its choice
    changed: bool  # the client sees other text than the model wrote (redacted or restored)


@dataclass
class _Stream:
    """One streamed text field under its own StreamGuard, with the spans of the model's text
    (offsets into the guard's buffer) that went out changed: redacted or restored."""

    guard: Any
    changed: list[tuple[int, int]] = field(default_factory=list)

    def taken(self, released: str, before: int) -> str:
        after = self.guard.emitted
        if released != self.guard.buffer[before:after]:
            self.changed.append((before, after))
        return released


@dataclass
class _Held:
    """A chunk's logprobs, waiting for the text they describe to be released: `spans` are
    (field, start, end) into each field's buffer; ("calls", 0, 0) for held tool calls."""

    logprobs: dict[str, Any]
    spans: list[tuple[str, int, int]]


@dataclass
class _Choice:
    texts: dict[str, _Stream] = field(default_factory=dict)
    # Held tool-call deltas per call index (and of the legacy `function_call`), merged once the
    # choice ends (`merge_pieces`); `held_chars` counts their strings against MAX_HELD_CALL_CHARS.
    calls: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    function_call: list[dict[str, Any]] | None = None
    held_chars: int = 0
    calls_released: bool = False
    calls_changed: bool = False
    pending: list[_Held] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    cut: bool = False
    done: bool = False
    # System-prompt overlap seen so far in any field of this choice (see `leak.STREAM_STATE_KEY`).
    leak: dict[Any, Any] = field(default_factory=dict)


class StreamScan:
    """The output policy over a stream, per choice and per field.

    Each text field (`content`, or a completion's `text`; `refusal`; `reasoning_content`;
    `reasoning`) gets its own StreamGuard: its text goes out only once scanned, redacted and
    restored. Tool calls of any type (`function`, `custom`, ...; and the legacy `function_call`)
    are held until their choice ends, merged (every string concatenated, at any depth), then
    scanned whole, every string of them, and sent as one delta each: a client acts on a call only
    once its arguments are complete anyway, and only whole arguments can be judged and restored as
    JSON. A choice whose held calls pass MAX_HELD_CALL_CHARS is cut there. A block in any
    field cuts the choice with `content_filter`; what it still held is dropped. All fields of a
    choice add up their evidence of a system-prompt leak: a prompt leaked half in the reasoning
    and half in a tool call's arguments is cut as the same text in the content alone would be.

    Logprobs are held with the text they describe and leave with the chunk that releases it. Those
    of text the guard changed (a redacted span, or a restored pseudonym) or never released (held
    when the choice was cut) never go out: they would show what the guard masked, and would not
    match the text the client got. We drop them per chunk, not for the whole choice: a chunk's
    logprobs whose text went out unchanged are safe to send, and a client still gets most of them.
    """

    def __init__(self, guard: Guard, inp: InputResult, route: str, n_choices: int) -> None:
        self.guard = guard
        self.inp = inp
        self.chat = route == "chat"
        self.n_choices = n_choices
        self.choices: dict[int, _Choice] = {}

    @property
    def all_cut(self) -> bool:
        return sum(st.cut for st in self.choices.values()) >= self.n_choices

    async def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """One backend chunk in; the chunks that may go to the client now (one per choice)."""
        out = []
        for c in chunk.get("choices") or []:
            st = self.choices.setdefault(int(c.get("index", 0)), _Choice())
            if st.cut or st.done:
                continue
            finish = c.get("finish_reason")
            nc = await self._step(st, c, finish, ending=finish is not None)
            if nc is not None:
                out.append({**chunk, "choices": [nc]})
        return out

    async def close(self, base: dict[str, Any], reason: str | None) -> list[dict[str, Any]]:
        """End every choice still open: scan and release what it holds (or cut it), with `reason`
        as its finish_reason: "length" for a budget cut, None where the upstream ended the stream
        without one (the gateway does not invent why it ended)."""
        out = []
        for i, st in sorted(self.choices.items()):
            if not (st.cut or st.done):
                empty: dict[str, Any] = {"index": i, "delta": {}} if self.chat else {"index": i, "text": ""}
                nc = await self._step(st, empty, reason, ending=True)
                if nc is not None:
                    out.append({**base, "choices": [nc]})
        return out

    async def _step(
        self, st: _Choice, c: dict[str, Any], finish: str | None, ending: bool
    ) -> dict[str, Any] | None:
        """One backend choice in; the choice to send (None: nothing to send yet). `ending`: the
        choice ends here, so all it holds is scanned and released (or it is cut)."""
        given = dict(c.get("delta") or {}) if self.chat else {"text": c.get("text")}
        delta = dict(given)  # what is left once the generated fields are taken out: role, extras
        sent: dict[str, str] = {}  # field -> text released now
        spans = await self._take_texts(st, delta, sent)
        spans += self._take_calls(st, delta, int(c.get("index", 0)))
        if c.get("logprobs"):
            st.pending.append(_Held(c["logprobs"], spans))
        if ending and not st.cut:
            await self._end(st, int(c.get("index", 0)), delta, sent)
        if st.cut:
            finish = "content_filter"
        st.done = ending or st.cut
        nc = dict(c)
        if self.chat:
            delta.update({f: t for f, t in sent.items() if t})
            if "role" in delta and "content" in given and "content" not in delta:
                delta["content"] = ""  # the opening delta keeps its shape
            nc["delta"] = delta
            has = bool(delta)
        else:
            nc["text"] = sent.get("text", "")
            has = bool(nc["text"])
        if not has and finish is None:
            if st.done:
                st.pending.clear()
            return None  # held back until scanned: nothing to send for this choice yet
        nc["finish_reason"] = finish
        logprobs = self._ready_logprobs(st)
        if logprobs is not None or "logprobs" in c:
            nc["logprobs"] = logprobs
        return nc

    async def _take_texts(
        self, st: _Choice, delta: dict[str, Any], sent: dict[str, str]
    ) -> list[tuple[str, int, int]]:
        """Feed the delta's text fields to their guards; returns where each piece lies in its
        field's buffer (what its logprobs wait for)."""
        spans = []
        for f in TEXT_FIELDS if self.chat else ("text",):
            piece = delta.pop(f, None)
            if isinstance(piece, list):  # parts in a delta: every string of them (`text`, `refusal`)
                piece = "".join(_slot_text(part[key]) for _, part, key in _slots({f: piece}, chat=True))
            if not isinstance(piece, str) or not piece or st.cut:
                continue
            s = st.texts.get(f)
            if s is None:
                s = st.texts[f] = _Stream(self.guard.new_stream_guard(self.inp, st.leak))
            start, before = len(s.guard.buffer), s.guard.emitted
            r = await self._feed(s.guard, piece)
            sent[f] = sent.get(f, "") + s.taken(r.text, before)
            spans.append((f, start, start + len(piece)))
            st.cut = st.cut or r.cut
        return spans

    @staticmethod
    def _take_calls(st: _Choice, delta: dict[str, Any], i: int) -> list[tuple[str, int, int]]:
        """Hold the delta's tool-call pieces, per call, until the choice ends. Past
        MAX_HELD_CALL_CHARS the choice is cut: what it held is dropped, and the trace says why."""
        spans: list[tuple[str, int, int]] = []
        for tc in delta.pop("tool_calls", None) or []:
            if isinstance(tc, dict):
                st.calls.setdefault(int(tc.get("index") or 0), []).append(tc)
                st.held_chars += _chars(tc)
                spans.append(("calls", 0, 0))
        fc = delta.pop("function_call", None)
        if isinstance(fc, dict):
            if st.function_call is None:
                st.function_call = []
            st.function_call.append(fc)
            st.held_chars += _chars(fc)
            spans.append(("calls", 0, 0))
        if st.held_chars > MAX_HELD_CALL_CHARS and not st.cut:
            st.cut = True
            st.calls.clear()
            st.function_call = None
            why = f"held tool calls exceed {MAX_HELD_CALL_CHARS} characters before their choice ended"
            st.reports.append(
                {
                    "stage": "output",
                    "choice": i,
                    "field": "tool_calls",
                    "scanned": False,
                    "cut": True,
                    "action": "block",
                    "errors": {"size": why},
                }
            )
        return spans

    async def _end(self, st: _Choice, i: int, delta: dict[str, Any], sent: dict[str, str]) -> None:
        """The choice ends: scan and release the rest of every text field, then its tool calls
        (into `delta`); or cut it."""
        for f, s in st.texts.items():
            before = s.guard.emitted
            r = await asyncio.to_thread(s.guard.finish)
            sent[f] = sent.get(f, "") + s.taken(r.text, before)
            if r.cut:
                st.cut = True
                return
        calls = await self._release_calls(st, i)
        st.cut = calls is None
        delta.update(calls or {})

    @staticmethod
    async def _feed(g: Any, piece: str) -> Any:
        step = g.window - g.overlap
        if len(g.buffer) + len(piece) - g.scanned_to >= step:
            return await asyncio.to_thread(g.feed, piece)  # a window fills: the encoder runs
        return g.feed(piece)

    async def _release_calls(self, st: _Choice, i: int) -> dict[str, Any] | None:
        """Scan a finished choice's held tool calls: what to add to its last delta, or None when
        one of them blocks (the choice is then cut, and no call goes out)."""
        out: dict[str, Any] = {}
        if st.calls:
            calls = {j: merge_pieces(st.calls[j]) for j in sorted(st.calls)}
            out["tool_calls"] = [
                {"index": j, **{k: v for k, v in c.items() if k != "index"}} for j, c in calls.items()
            ]
        if st.function_call is not None:
            out["function_call"] = merge_pieces(st.function_call)
        blocked, changed = await self.guard.scan_slots(out, self.chat, self.inp, i, st.leak, st.reports)
        if blocked:
            return None
        st.calls_changed = st.calls_changed or changed
        st.calls_released = True
        return out

    @staticmethod
    def _ready_logprobs(st: _Choice) -> dict[str, Any] | None:
        """The held logprobs whose text has all gone out unchanged, merged; those whose text went
        out changed are dropped; once the choice is done, so is everything still held."""
        ready, keep = [], []
        for held in st.pending:
            state = "ready"
            for f, a, b in held.spans:
                if f == "calls":
                    if st.calls_changed:
                        state = "drop"
                    elif not st.calls_released and state == "ready":
                        state = "wait"
                    continue
                s = st.texts[f]
                if any(x < b and a < y for x, y in s.changed):
                    state = "drop"
                elif s.guard.emitted < b and state == "ready":
                    state = "wait"
            if state == "ready":
                ready.append(held.logprobs)
            elif state == "wait" and not st.done:
                keep.append(held)
        st.pending = keep
        return merge_logprobs(ready)

    def reports(self) -> list[dict[str, Any]]:
        """One entry per scanned field; held tool calls never scanned (the stream stopped first)
        say so, rather than being left out."""
        out: list[dict[str, Any]] = []
        for i, st in sorted(self.choices.items()):
            out += [
                {"stage": "output", "choice": i, "field": f, **s.guard.report()} for f, s in st.texts.items()
            ]
            out += st.reports
            if (st.calls or st.function_call) and not st.calls_released:
                out.append(
                    {"stage": "output", "choice": i, "field": "tool_calls", "scanned": False, "cut": st.cut}
                )
        return out


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
            # Fail closed for this tenant only (see app.stale_tenant_policies): a configuration
            # problem an admin can fix at once, not an internal error.
            raise APIError(
                503,
                f"this tenant is bound to guard policy {name!r}, which this gateway does not define; "
                "its requests are refused until an admin binds a policy that exists",
                type="service_unavailable",
                code="policy_unavailable",
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
        return InputResult(ctx, v.vault if v.vault is not None else request_vault())

    async def scan_output(self, route: str, out: dict[str, Any], inp: InputResult, trace: Trace) -> bool:
        """Scan every text each choice carries from the model (content, as a string or as parts;
        refusal; reasoning; every string of every tool call, `custom.input` and object-valued
        `arguments` included; see `_slots`), redacting and restoring each in place.
        A block in any field cuts the choice: `finish_reason: "content_filter"`, no text and no
        tool call. Returns whether every choice was cut, which makes the outcome "blocked", as it
        is for a stream.

        The fields of one choice are scanned as parts of one answer: their system-prompt overlap
        adds up, so a prompt leaked in pieces across fields is blocked as it would be in one.

        Logprobs are dropped (null) for a choice whose text the client gets changed: they would
        carry the words the guard masked or blocked. A whole answer's logprobs are tokens, not
        character spans, so the choice's are dropped whole rather than guessed at."""
        chat = route == "chat"
        choices = [c for c in out.get("choices") or [] if isinstance(c, dict)]
        cut = 0
        for choice in choices:
            holder = choice.get("message") if chat else choice
            if not isinstance(holder, dict):
                continue
            leak: dict[Any, Any] = {}  # this choice's system-prompt overlap, over all its fields
            blocked, changed = await self.scan_slots(
                holder, chat, inp, choice.get("index", 0), leak, trace.guard
            )
            if blocked:
                cut += 1
                choice["finish_reason"] = "content_filter"
                if chat:
                    kept = {k: v for k, v in holder.items() if k not in GENERATED}
                    choice["message"] = {**kept, "content": ""}
                else:
                    choice["text"] = ""
            if (blocked or changed) and choice.get("logprobs") is not None:
                choice["logprobs"] = None
        return bool(choices) and cut == len(choices)

    async def scan_slots(
        self,
        holder: dict[str, Any],
        chat: bool,
        inp: InputResult,
        i: Any,
        leak: dict[Any, Any],
        reports: list[dict[str, Any]],
    ) -> tuple[bool, bool]:
        """Scan every generated slot of `holder` (see `_slots`), redacting in place and adding one
        entry per field to `reports`; returns (blocked, changed). The first block stops the scan.
        `arguments` given as an object are scanned serialised and written back as an object."""
        changed = False
        for where, box, key in _slots(holder, chat):
            value = box[key]
            text = _slot_text(value)
            s = await self.scan_field(
                text, inp, json_text=key in JSON_KEYS or not isinstance(value, str), leak_state=leak
            )
            reports.append({"stage": "output", "choice": i, "field": where, **s.report})
            if s.text is None:
                return True, True
            if s.changed:
                box[key] = s.text if isinstance(value, str) else json.loads(s.text)
            changed = changed or s.changed
        return False, changed

    async def scan_field(
        self,
        text: str,
        inp: InputResult,
        *,
        json_text: bool = False,
        leak_state: dict[Any, Any] | None = None,
    ) -> FieldScan:
        """One generated text through the output policy, with the request's vault: the answer's
        own PII is pseudonymised into it (so never under a token of the request's) and the
        caller's values are restored from it. `leak_state` is shared by the fields of one choice
        (their system-prompt overlap adds up). Tool-call arguments (`json_text`) that are JSON with
        strings are scanned decoded, string by string (`_scan_json`); other arguments are scanned
        as text, get restored values JSON-escaped, and tokens seen only once the JSON is decoded
        (`\\u003c...`) restored by `restore_json`; if redacting or restoring broke arguments that
        were valid JSON, the field blocks: the client's tool cannot parse them, and unmasking is not
        an option."""
        from steward.guard import Action

        if json_text:
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            if _json_leaves(obj):
                return await self._scan_json(text, obj, inp, leak_state)
        escape = json_escape if json_text else None
        v = await self.pipeline.scan_output(text, inp.ctx, inp.vault, leak_state=leak_state, escape=escape)
        report = v.to_trace()
        if v.blocked:
            return FieldScan(report, None, True)
        shown = v.text if v.text is not None else text
        if json_text:
            if self.pipeline.policy_for(inp.ctx)[1].restore_pseudonyms:
                shown = restore_json(shown, inp.vault)
            if shown != text and _is_json(text) and not _is_json(shown):
                why = "redacting or restoring a span left the arguments invalid JSON"
                report.update(action=Action.BLOCK.value, errors={**report["errors"], "json": why})
                return FieldScan(report, None, True)
        return FieldScan(report, shown, shown != text)

    async def _scan_json(
        self, text: str, obj: Any, inp: InputResult, leak_state: dict[Any, Any] | None
    ) -> FieldScan:
        """JSON arguments as the client's tool reads them (`_json_leaves`): their strings decoded,
        keys included, and their numbers, one per line, as the input side scans them
        (`pipeline._arguments_text`), so that a value written with JSON escapes (`\\u0041KIA...`)
        is seen as what it decodes to. If the policy changes anything (a redaction, a restored
        pseudonym), each leaf is redacted and restored on its own and the arguments are written
        out again, valid JSON by construction; the leaves must then join to what the whole scan
        gave, or the field blocks (a span that crossed leaves cannot be placed, and unmasking is
        not an option)."""
        from steward.guard import Action

        strings = _json_leaves(obj)
        joined = "\n".join(strings)
        ctx, vault = inp.ctx, inp.vault
        v = await self.pipeline.scan_output(joined, ctx, vault, leak_state=leak_state)
        report = v.to_trace()
        if v.blocked:
            return FieldScan(report, None, True)
        shown = v.text if v.text is not None else joined
        if shown == joined:
            return FieldScan(report, text, False)
        # Which leaves changed, line by line where the policy kept the lines (it usually does):
        # only those are scanned again; else all are.
        lines, shown_lines = joined.split("\n"), shown.split("\n")
        same = len(lines) == len(shown_lines)
        new: list[str] = []
        at = 0
        for one in strings:
            end = at + one.count("\n") + 1
            if same and lines[at:end] == shown_lines[at:end]:
                new.append(one)
            else:
                w = await self.pipeline.scan_output(one, ctx, vault)
                if w.blocked:
                    new = []
                    break
                new.append(w.text if w.text is not None else one)
            at = end
        if len(new) != len(strings) or "\n".join(new) != shown:
            why = "a redaction of the decoded arguments could not be placed string by string"
            report.update(action=Action.BLOCK.value, errors={**report["errors"], "json": why})
            return FieldScan(report, None, True)
        return FieldScan(report, json.dumps(_json_put(obj, new), ensure_ascii=False), True)

    def new_stream_guard(self, inp: InputResult, leak_state: dict[Any, Any] | None = None) -> Any:
        """A StreamGuard for one streamed field; the fields of one choice share `leak_state`."""
        return self.pipeline.stream(
            inp.ctx, inp.vault, window=STREAM_WINDOW, overlap=STREAM_OVERLAP, leak_state=leak_state
        )

    def stream(self, inp: InputResult, route: str = "chat", n_choices: int = 1) -> StreamScan:
        return StreamScan(self, inp, route, n_choices)


def _json_leaves(obj: Any) -> list[str]:
    """What is scanned of JSON arguments: every string decoded, keys included, as the input side
    reads them (`pipeline._json_strings`), and every number as JSON writes it (a card or phone
    number given as a number), in document order."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [json.dumps(obj)]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (k, *_json_leaves(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _json_leaves(v)]
    return []


def _json_put(obj: Any, new: list[str]) -> Any:
    """`obj` with its leaves (in `_json_leaves` order) taken from `new`, front first: a number
    the policy changed becomes the redacted string."""
    it = iter(new)

    def put(value: Any) -> Any:
        if isinstance(value, str):
            return next(it)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = next(it)
            return value if text == json.dumps(value) else text
        if isinstance(value, dict):
            return {next(it): put(v) for v in value.values()}
        if isinstance(value, list):
            return [put(v) for v in value]
        return value

    return put(obj)


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
