"""The guard stages of a request: input scan (with canary and redaction), output scan, stream scan.

The gateway holds one `steward.guard.Pipeline`. A tenant's policy comes from the policy file's
bindings, or from the tenant's `policy` field in the store (set by `PUT /admin/tenants/{id}`), which
is added as a binding the first time the tenant is seen. Every verdict goes into the trace; the
trace never holds matched text.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from steward.gateway.errors import APIError
from steward.gateway.keys import Principal
from steward.gateway.trace import Trace
from steward.surrogates import escape_surrogates

if TYPE_CHECKING:
    from steward.guard.types import Role

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
PASS_KEYS = ("role",)
"""The keys of a message (or delta) the server writes, not the model. Every other key is the
model's: the text fields and calls above, and fields the guard has no name for (OpenAI's
`audio.transcript`, OpenRouter's `reasoning_details[].text`, `annotations`, whatever a server adds
next). Those are scanned too, every string of them (see `_slots`): held in a stream until their
choice ends, as tool calls are, counted against a stream's budget and kept in the audit payload."""
EXTRA_META = ("id", "type", "index", "format", "signature")
"""Keys, at any depth of a field the guard has no name for, whose strings the server writes (an
id, a type tag, a format name, a provider's opaque signature): never scanned, and in a stream each
keeps its first value rather than being concatenated."""
UNSCANNABLE = {"audio": ("data",)}
"""Generated output no text scanner can read (audio itself, base64): dropped, never sent, and the
trace says so. A request that asks for audio output is refused up front (`Guard.scan_input`)."""


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
    yet), and `arguments` given as an object as one slot (scanned as JSON); a field the guard has
    no name for (see PASS_KEYS) gives every string under it but its `EXTRA_META` ones."""
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
    for name, v in holder.items():
        if name not in GENERATED and name not in PASS_KEYS:
            _extra_leaves(v, name, holder, name, out)
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


def _extra_leaves(value: Any, where: str, box: Any, key: Any, out: list[Slot]) -> None:
    """The slots of every non-empty string under a field the guard has no name for, but those
    under `EXTRA_META` keys."""
    if isinstance(value, str):
        if value:
            out.append((where, box, key))
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in EXTRA_META:
                _extra_leaves(v, f"{where}.{k}", value, k, out)
    elif isinstance(value, list):
        for n, v in enumerate(value):
            _extra_leaves(v, f"{where}[{n}]", value, n, out)


def drop_unscannable(holder: dict[str, Any]) -> list[str]:
    """Remove what no scanner can read from a message or delta (`UNSCANNABLE`), in place; returns
    the fields dropped, for the trace."""
    dropped = []
    for k, inner in UNSCANNABLE.items():
        box = holder.get(k)
        if isinstance(box, dict):
            dropped += [f"{k}.{name}" for name in inner if box.pop(name, None) is not None]
    return dropped


def unscannable_report(i: Any, where: str) -> dict[str, Any]:
    return {
        "stage": "output",
        "choice": i,
        "field": where,
        "scanned": False,
        "action": "drop",
        "errors": {"unscannable": "output no scanner can read is not sent"},
    }


def json_dumps(value: Any) -> str:
    """`value` as JSON text: non-ASCII as it is, lone surrogates escaped."""
    return escape_surrogates(json.dumps(value, ensure_ascii=False))


def _slot_text(value: Any) -> str:
    """A slot's text: the string, or an object given for JSON serialised."""
    return value if isinstance(value, str) else json_dumps(value)


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


def merge_pieces(pieces: list[dict[str, Any]], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """A streamed tool call's deltas as one call, as `merge_call` one after the other would make
    it, in linear time: every string's pieces are gathered in a list and joined once. Strings under
    `keep` keys, at any depth, keep their first value too."""
    acc: dict[str, Any] = {}
    for piece in pieces:
        _gather(acc, piece, top=True, keep=keep)
    merged: dict[str, Any] = _joined(acc)
    return merged


def _gather(acc: dict[str, Any], piece: dict[str, Any], top: bool, keep: tuple[str, ...] = ()) -> None:
    for k, v in piece.items():
        cur = acc.get(k)
        if isinstance(v, dict) and (cur is None or isinstance(cur, dict)):
            if cur is None:
                cur = acc[k] = {}
            _gather(cur, v, top=False, keep=keep)
        elif cur is None:  # a key not given yet, or given as null
            acc[k] = _Pieces([v]) if isinstance(v, str) else v
        elif (
            isinstance(v, str) and isinstance(cur, _Pieces) and not (top and k in CALL_META) and k not in keep
        ):
            cur.append(v)


def merge_extra(values: list[Any]) -> Any:
    """A streamed field the guard has no name for, from its deltas: strings concatenated, objects
    merged (`merge_pieces`, `EXTRA_META` strings keeping their first value), lists merged item by
    item (by each item's `index`, else its position: OpenRouter streams `reasoning_details` so);
    anything else keeps its first value."""
    given = [v for v in values if v is not None]
    if not given:
        return values[0] if values else None
    if all(isinstance(v, str) for v in given):
        return "".join(given)
    if all(isinstance(v, dict) for v in given):
        return merge_pieces(given, keep=EXTRA_META)
    if all(isinstance(v, list) for v in given):
        items: dict[int, list[Any]] = {}
        for v in given:
            for j, item in enumerate(v):
                at = item.get("index") if isinstance(item, dict) else None
                key = at if isinstance(at, int) and not isinstance(at, bool) else j
                items.setdefault(key, []).append(item)
        return [merge_extra(items[k]) for k in sorted(items)]
    return given[0]


def call_index(tc: dict[str, Any]) -> int | None:
    """A streamed tool call's `index` as an int: None where it is missing or not a whole number
    (`"x"`, `-1`, `true`): such a delta is placed by its `id` (see `CallSlots`), never a crash."""
    v = tc.get("index")
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    return v if isinstance(v, int) and v >= 0 else None


class CallSlots:
    """Which call of a choice each streamed tool-call delta belongs to. Usually its `index`; but
    some servers (Gemini's OpenAI-compatible API, some proxies) leave `index` out, or send 0 for
    every call, and send each of several parallel calls whole with its own `id`: a delta whose `id`
    differs from the one its index (or, with no index, the last call) has so far starts a new call,
    rather than being concatenated into it. A delta without an index or id continues the last call.
    Each call's slot is the index it goes out with: the upstream's while that is free, else the
    next one unused."""

    def __init__(self) -> None:
        self._at: dict[int, int] = {}  # upstream index -> its current slot
        self._ids: dict[int, str] = {}  # slot -> the id its call was given
        self._used: set[int] = set()
        self._last: int | None = None

    def slot(self, tc: dict[str, Any]) -> int:
        key = call_index(tc)
        cid = tc.get("id") if isinstance(tc.get("id"), str) and tc.get("id") else None
        cur = self._at.get(key) if key is not None else self._last
        if cur is None or (cid is not None and self._ids.get(cur, cid) != cid):
            cur = key if key is not None and key not in self._used else max(self._used, default=-1) + 1
            self._used.add(cur)
        if cid is not None:
            self._ids.setdefault(cur, cid)
        if key is not None:
            self._at[key] = cur
        self._last = cur
        return cur


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
        return pattern.sub(lambda m: json_escape(vault.restore(m.group())), text)
    restored = _restore_strings(parsed, vault)
    return text if restored == parsed else json_dumps(restored)


def _restore_strings(value: Any, vault: Any) -> Any:
    if isinstance(value, str):
        return vault.restore(value, literal=True)
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
    """`value` as it goes between the quotes of a JSON string (a lone surrogate as its escape)."""
    return json_dumps(value)[1:-1]


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
    slots: CallSlots = field(default_factory=CallSlots)
    function_call: list[dict[str, Any]] | None = None
    # Fields the guard has no name for (see PASS_KEYS), held like tool calls: their deltas per key,
    # merged once the choice ends (`merge_extra`); and what was dropped unread (`UNSCANNABLE`).
    extras: dict[str, list[Any]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
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
    JSON. Parallel calls are told apart by `index`, or by `id` where a server gives every call
    the same index or none (`CallSlots`). Fields the guard has no name for (`audio`,
    `reasoning_details`, ...: see PASS_KEYS) are held and scanned the same way, merged
    (`merge_extra`); audio itself, which no scanner reads, is dropped and reported (`UNSCANNABLE`).
    A choice whose held calls and fields pass MAX_HELD_CALL_CHARS is cut there. A block in any
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
        """Every choice the request asked for was cut: nothing more can go out."""
        return sum(st.cut for st in self.choices.values()) >= self.n_choices

    @property
    def all_seen_cut(self) -> bool:
        """Every choice that arrived was cut. Once the upstream has ended, this is what makes the
        outcome "blocked": many servers ignore `n` and send fewer choices than asked, and a stream
        whose one choice was cut gave its client nothing, as the same answer non-streamed would.
        (Not a reason to stop reading: a choice not seen yet may still come.)"""
        return bool(self.choices) and all(st.cut for st in self.choices.values())

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
        if self.chat:
            spans += self._take_extras(st, delta)
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
    def _take_extras(st: _Choice, delta: dict[str, Any]) -> list[tuple[str, int, int]]:
        """Hold the delta's fields the guard has no name for until the choice ends, as tool calls
        are (what no scanner can read is dropped here, and reported)."""
        st.dropped += drop_unscannable(delta)
        spans: list[tuple[str, int, int]] = []
        for k in [k for k in delta if k not in GENERATED and k not in PASS_KEYS]:
            v = delta.pop(k)
            if not st.cut:
                st.extras.setdefault(k, []).append(v)
                st.held_chars += _chars(v)
                spans.append(("calls", 0, 0))
        return spans

    @staticmethod
    def _take_calls(st: _Choice, delta: dict[str, Any], i: int) -> list[tuple[str, int, int]]:
        """Hold the delta's tool-call pieces, per call (`CallSlots`), until the choice ends. Past
        MAX_HELD_CALL_CHARS the choice is cut: what it held is dropped, and the trace says why."""
        spans: list[tuple[str, int, int]] = []
        calls = delta.pop("tool_calls", None)
        for tc in calls if isinstance(calls, list) else []:
            if isinstance(tc, dict):
                st.calls.setdefault(st.slots.slot(tc), []).append(tc)
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
            st.extras.clear()
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
        out.update({k: merge_extra(v) for k, v in st.extras.items()})
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
            out += [unscannable_report(i, where) for where in dict.fromkeys(st.dropped)]
            if (st.calls or st.function_call or st.extras) and not st.calls_released:
                out.append(
                    {"stage": "output", "choice": i, "field": "tool_calls", "scanned": False, "cut": st.cut}
                )
        return out


class Guard:
    def __init__(self, policies: Any = None, *, hash_key: bytes | None = None) -> None:
        from steward.guard import Pipeline

        self.pipeline = Pipeline(policies, hash_key=hash_key)
        self._file = self.pipeline.policies  # the policy file's own bindings
        self._stored: dict[str, str] = {}  # tenant -> policy named in the store, as last applied

    def canary(self, tenant: str, system: str) -> str:
        """A canary the model never needs: seeing it in an answer proves the system prompt leaked.
        Keyed by the deployment's secret (`redact.load_hash_key`), so no caller can predict it, and
        fixed per tenant and system prompt: a random one per request made every request with a
        system prompt unrepeatable (a `seed` gave other text each time, even greedy decoding) and
        its prompt-token count vary with how the random hex tokenised."""
        msg = b"canary\x00" + tenant.encode() + b"\x00" + system.encode("utf-8", "surrogatepass")
        return "stw-canary-" + hmac.new(self.pipeline.hash_key, msg, hashlib.sha256).hexdigest()[:12]

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
        # The store's policy replaces every file binding of the tenant, route-specific ones too:
        # an admin who sets a tenant's policy gets it on every route, never a rank-3 file binding
        # of (tenant, route) silently winning over it. Clearing it gives them all back.
        kept = [b for b in self._file.bindings if b.tenant not in stored]
        added = [Binding(tenant=t, route="*", policy=n) for t, n in sorted(stored.items())]
        self.pipeline.policies = self._file.model_copy(update={"bindings": [*kept, *added]})
        self._stored = stored

    def policy_names(self) -> list[str]:
        return sorted(self.pipeline.policies.policies)

    async def scan_input(self, route: str, body: dict[str, Any], p: Principal, trace: Trace) -> InputResult:
        """Scan everything of the request that reaches the model: chat turns (system, user, earlier
        assistant turns and documents, by the policy), every string of them the model reads (see
        `pipeline._message_texts`), completion prompts and `suffix`, embedding inputs, and every
        other request field the model may read (tool definitions, schemas, `prediction`, fields
        the gateway has no name for, such as vLLM's `documents`; see `NOT_READ`, `READ_AS`), all in
        one batch. Raises a 400 when the policy blocks, naming the categories or why nothing was
        scanned; redacts the body in place when the policy redacts. The trace's input entry lists
        every text scanned under `fields`."""
        from steward.guard import Action, ScanContext
        from steward.guard.pipeline import content_text, media_parts

        self.bind(p)
        unscannable = route == "chat" and _asks_for_unscannable_output(body)
        if unscannable and self.pipeline.policies.select(p.tenant, route)[1].output:
            # Speech or images are model output no text scanner reads: refused, not let through.
            raise APIError(
                400,
                "audio or image output cannot be checked by this gateway's output guard; ask for text only",
                param="modalities",
                code="unsupported_parameter",
            )
        canary = None
        system = None
        if route == "chat":
            messages = body["messages"]
            for m in messages:
                text = content_text(m.get("content")) if m.get("role") in ("system", "developer") else None
                if text is not None:
                    system = (system + "\n" if system else "") + text
            if system is not None:
                canary = self.canary(p.tenant, system)
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
        # The request's other texts the model reads (tool definitions, schemas, RAG documents),
        # in the same encoder batch as the turns: a request without them costs what it did.
        slots = _request_fields(body)
        scanned: list[str] = []
        v = await self.pipeline.scan_input(scan_msgs, ctx, [f for f, _, _ in slots], scanned)
        if route != "chat":  # the prompts went in as one-turn messages: named as the caller sent them
            scanned = _prompt_labels(scanned, key, body)
        # What was scanned, by field: the verdict's `scanned` covers exactly these texts.
        # Media parts are never scanned (no text scanner reads an image): counted, so a trace with
        # `scanned: true` still says the request held media the guard did not read.
        media = len(media_parts(scan_msgs)) if route == "chat" else 0
        trace.guard.append({"stage": "input", **v.to_trace(), "fields": scanned, "media_unscanned": media})
        trace.policy_version = f"{v.policy_name}@{v.policy_version[:12]}"
        if v.blocked:
            raise APIError(400, _blocked_message(v), code="content_policy_violation")
        if v.action is Action.REDACT:
            for f, box, where in slots:
                if f.redacted is not None:
                    box[where] = f.redacted
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
        `arguments` included; every string of a field the guard has no name for, such as
        `audio.transcript`; see `_slots`), redacting and restoring each in place. Audio itself is
        dropped (`UNSCANNABLE`), and the trace says so.
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
            if chat:
                i = choice.get("index", 0)
                trace.guard += [unscannable_report(i, where) for where in drop_unscannable(holder)]
            blocked, changed = await self.scan_slots(
                holder, chat, inp, choice.get("index", 0), leak, trace.guard
            )
            if blocked:
                cut += 1
                choice["finish_reason"] = "content_filter"
                if chat:
                    kept = {k: v for k, v in holder.items() if k in PASS_KEYS}
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
        strings or numbers are scanned decoded, string by string (`_scan_json`); other arguments
        are scanned as text and get restored values JSON-escaped, once (a restored value that holds
        a token's text is the caller's, not a token to restore again), a backslash before a token
        kept (it escapes the JSON, not the token); if redacting or restoring broke arguments that
        were valid JSON, the field blocks: the client's tool cannot parse them, and unmasking is not
        an option."""
        from steward.guard import Action
        from steward.guard.redact import CALL_RESTORABLE, RESTORABLE

        if json_text:
            literals = _json_literals(text)
            if literals:
                return await self._scan_json(text, literals, inp, leak_state)
        escape = json_escape if json_text else None
        # Tool-call arguments go to the developer's code: values of its own schemas come back too.
        origins = CALL_RESTORABLE if json_text else RESTORABLE
        v = await self.pipeline.scan_output(
            text, inp.ctx, inp.vault, leak_state=leak_state, escape=escape, literal=json_text, origins=origins
        )
        report = v.to_trace()
        if v.blocked:
            return FieldScan(report, None, True)
        shown = v.text if v.text is not None else text
        if json_text and shown != text and _is_json(text) and not _is_json(shown):
            why = "redacting or restoring a span left the arguments invalid JSON"
            report.update(action=Action.BLOCK.value, errors={**report["errors"], "json": why})
            return FieldScan(report, None, True)
        return FieldScan(report, shown, shown != text)

    async def _scan_json(
        self, text: str, literals: list[_Literal], inp: InputResult, leak_state: dict[Any, Any] | None
    ) -> FieldScan:
        """JSON arguments as the client's tool reads them (`_json_literals`): their strings
        decoded, keys included, and their numbers, one per line, as the input side scans them
        (`pipeline._arguments_text`), so that a value written with JSON escapes (`\\u0041KIA...`)
        is seen as what it decodes to. If the policy changes anything (a redaction, a restored
        pseudonym), each leaf is redacted and restored on its own and only the changed leaves are
        written again, in place (`_json_rewrite`): every other byte of the arguments, numbers and
        escapes included, stays as the model wrote it. The leaves must then join to what the whole
        scan gave, or the field blocks (a span that crossed leaves cannot be placed, and unmasking
        is not an option)."""
        from steward.guard import Action
        from steward.guard.redact import CALL_RESTORABLE

        strings = [lit.value for lit in literals]
        joined = "\n".join(strings)
        ctx, vault = inp.ctx, inp.vault
        v = await self.pipeline.scan_output(
            joined, ctx, vault, leak_state=leak_state, literal=True, origins=CALL_RESTORABLE
        )
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
                w = await self.pipeline.scan_output(one, ctx, vault, literal=True, origins=CALL_RESTORABLE)
                if w.blocked:
                    new = []
                    break
                new.append(w.text if w.text is not None else one)
            at = end
        if len(new) != len(strings) or "\n".join(new) != shown:
            why = "a redaction of the decoded arguments could not be placed string by string"
            report.update(action=Action.BLOCK.value, errors={**report["errors"], "json": why})
            return FieldScan(report, None, True)
        return FieldScan(report, _json_rewrite(text, literals, new), True)

    def new_stream_guard(self, inp: InputResult, leak_state: dict[Any, Any] | None = None) -> Any:
        """A StreamGuard for one streamed field; the fields of one choice share `leak_state`."""
        return self.pipeline.stream(
            inp.ctx, inp.vault, window=STREAM_WINDOW, overlap=STREAM_OVERLAP, leak_state=leak_state
        )

    def stream(self, inp: InputResult, route: str = "chat", n_choices: int = 1) -> StreamScan:
        return StreamScan(self, inp, route, n_choices)


_JSON_TOKEN = re.compile(
    r'\s*(?:("(?:[^"\\]++|\\.)*+")|(-?(?:Infinity|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|NaN)|true|false|null|([{}\[\]:,]))'
)


@dataclass
class _Literal:
    """A string or number of JSON text: where it is, what it reads as (a string decoded, a number
    as written), and, for an object's key, which object it names a member of."""

    start: int
    end: int
    value: str
    key_of: int | None


def _json_literals(text: str) -> list[_Literal]:
    """Every string (keys included) and number of JSON `text`, in document order: what is scanned
    of JSON arguments, as the input side reads them (`pipeline._json_strings`); empty when `text`
    is not JSON or holds neither. Read off the text itself, not a parse of it, so that each can be
    written back in place: a duplicate key is seen (and scanned) twice, a number keeps its
    spelling, an escape the model wrote stays."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return []
    out: list[_Literal] = []
    stack: list[int | None] = []  # per open container: the object's number, None for an array
    expect_key = False
    objects = pos = 0
    while (m := _JSON_TOKEN.match(text, pos)) is not None and m.end() > pos:
        pos = m.end()
        string, number, punct = m.groups()
        if string is not None:
            key = stack[-1] if expect_key and stack else None
            out.append(_Literal(m.start(1), m.end(1), json.loads(string), key))
        elif number is not None:
            out.append(_Literal(m.start(2), m.end(2), number, None))
        elif punct == "{":
            objects += 1
            stack.append(objects)
            expect_key = True
        elif punct == "[":
            stack.append(None)
            expect_key = False
        elif punct in ("}", "]"):
            if stack:
                stack.pop()
            expect_key = False
        elif punct == ",":
            expect_key = bool(stack) and stack[-1] is not None
        elif punct == ":":
            expect_key = False
    return out if not text[pos:].strip() else []


def _json_rewrite(text: str, literals: list[_Literal], new: list[str]) -> str:
    """`text` with each literal whose value the policy changed written again as a JSON string (a
    number the policy changed becomes the redacted string, as the input side does), everything
    else as it was. A changed key never takes the name another key of its object has (two
    addresses masked to `[EMAIL_ADDRESS]` would make a parser keep one of the two members): it
    gets a ` (2)`, ` (3)`, ... suffix, so every member the model wrote reaches the tool."""
    taken: dict[int, set[str]] = {}
    for lit, value in zip(literals, new, strict=True):
        if lit.key_of is not None and value == lit.value:
            taken.setdefault(lit.key_of, set()).add(value)
    pieces: list[str] = []
    pos = 0
    for lit, value in zip(literals, new, strict=True):
        if value == lit.value:
            continue
        if lit.key_of is not None:
            names = taken.setdefault(lit.key_of, set())
            name, n = value, 1
            while name in names:
                n += 1
                name = f"{value} ({n})"
            names.add(name)
            value = name
        pieces += [text[pos : lit.start], json_dumps(value)]
        pos = lit.end
    pieces.append(text[pos:])
    return "".join(pieces)


def _asks_for_unscannable_output(body: dict[str, Any]) -> bool:
    """Whether a chat request turns on output other than text: OpenAI's `audio` parameter, or any
    `modalities` but "text" (OpenAI's "audio", OpenRouter's "image")."""
    modalities = body.get("modalities")
    other = modalities is not None and (
        not isinstance(modalities, list) or any(m != "text" for m in modalities)
    )
    return other or body.get("audio") is not None


NOT_READ = frozenset(
    {
        # Read, but scanned as the turns: messages, prompts, `suffix`, embedding inputs.
        "messages",
        "prompt",
        "suffix",
        "input",
        # Choose the model, or how it samples and what comes back: never part of the prompt.
        "model",
        "stream",
        "stream_options",
        "n",
        "best_of",
        "echo",
        "seed",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "encoding_format",
        "dimensions",
        "reasoning_effort",
        "reasoning",  # OpenRouter's {"effort": "high", "max_tokens": ..., "exclude": ...}
        "include_reasoning",
        "thinking",  # {"type": "enabled", "budget_tokens": ...}
        "verbosity",
        "modalities",
        "audio",  # a voice and a format; audio output itself is refused above
        # Where sampling stops: the sampler matches these against generated text, the model never
        # reads them (and redacting one would only change where an answer ends).
        "stop",
        # Name a tool `tools` defines (and `tools` is scanned).
        "tool_choice",
        "function_call",
        "parallel_tool_calls",
        # Ids and bookkeeping for the provider, not the prompt. They may name a person (`user` is
        # meant to): the gateway's trace keeps `user` only pseudonymised and the audit payload
        # encrypted, and what goes upstream is the caller's choice of identifier.
        "user",
        "metadata",
        "safety_identifier",
        "prompt_cache_key",
        "store",
        "service_tier",
        "request_id",  # vLLM's
        # Server and routing switches (vLLM's decoding backend, OpenRouter's model fallbacks and
        # provider preferences): which machinery answers, never text for the model.
        "guided_decoding_backend",
        "models",
        "route",
        "provider",
        "transforms",
    }
)
"""Top-level request fields whose strings no model reads as text. Every other field with a string
in it is scanned (`_request_fields`), including fields the gateway has no name for: an upstream
may feed them to the model (vLLM renders `documents` and `chat_template_kwargs` into the prompt)."""
READ_AS: dict[str, Role] = {
    # Tool and schema definitions are rendered into the prompt and read as instructions, written
    # by the caller's developer like a system prompt, and read the same way: for PII and secrets.
    # Instructions are what they are by design ("You must confirm the time with the user first"),
    # and the injection classifier blocks ordinary ones (measured on plain tool definitions) as it
    # would a system prompt. So a poisoned third-party tool description (an MCP server's) is
    # not caught here, as a poisoned system prompt is not; RAG text (`documents`) is.
    "tools": "system",
    "functions": "system",
    "response_format": "system",
    # vLLM's: output constraints (like `response_format`) and a caller-supplied chat template, the
    # developer's too; template syntax reads as role spoofing to the classifier (measured).
    "guided_json": "system",
    "guided_regex": "system",
    "guided_choice": "system",
    "guided_grammar": "system",
    "structured_outputs": "system",
    "chat_template": "system",
    # Text the answer is expected to repeat (predicted outputs): the caller's own, like a user turn,
    # so a pseudonym in it is restored in the answer.
    "prediction": "user",
}
"""The role each known field the model reads is scanned as; a field not named here or in
`NOT_READ` is read as a document."""
SCHEMA_FIELDS: dict[str, str] = {"tools": "schema", "functions": "schema", "response_format": "schema"}
"""Fields holding the caller's tool and response schemas: a value pseudonymised in them is restored
in tool-call arguments (the model copies an `enum` member into a call for the developer's own code;
see `redact.CALL_RESTORABLE`), never in an answer's content."""
SPLIT = ("tools", "functions")
"""Lists whose items are scanned (and named in the trace) one by one: `tools[0]`, `tools[1]`."""


def _request_fields(body: dict[str, Any]) -> list[tuple[Any, Any, Any]]:
    """(InputField, the dict or list holding it, its key there) for each top-level field of the
    request the model may read: every field not in `NOT_READ` that holds a string. A field with
    numbers and flags only (`top_k`, `chat_template_kwargs: {enable_thinking: false}`) is a sampling
    or template switch, not text."""
    from steward.guard.pipeline import InputField, key_label

    out: list[tuple[Any, Any, Any]] = []
    for name, value in body.items():
        if name in NOT_READ or not _has_string(value):
            continue
        role = READ_AS.get(name, "document")
        label = key_label(name)  # an unknown field's name is the caller's text
        if name in SPLIT and isinstance(value, list):
            items = [(j, v) for j, v in enumerate(value) if _has_string(v)]
            origin = SCHEMA_FIELDS.get(name)
            out += [(InputField(f"{label}[{j}]", v, role, origin=origin), value, j) for j, v in items]
        else:
            out.append((InputField(label, value, role, origin=SCHEMA_FIELDS.get(name)), body, name))
    return out


def _has_string(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, dict):
        return any(isinstance(k, str) and _has_string(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_string(v) for v in value)
    return False


def _prompt_labels(scanned: list[str], key: str, body: dict[str, Any]) -> list[str]:
    """The trace's names of a completion's or embedding's texts, which were scanned as one-turn
    messages: `prompt[0]`, `suffix`, `input` rather than `messages[0].content`."""
    n = len(body[key]) if isinstance(body[key], list) else 1
    out = []
    for label in scanned:
        m = re.fullmatch(r"messages\[(\d+)\]\.content", label)
        if m is None:
            out.append(label)
        elif int(m.group(1)) >= n:
            out.append("suffix")
        else:
            out.append(f"{key}[{m.group(1)}]" if isinstance(body[key], list) else key)
    return out


def _blocked_message(v: Any) -> str:
    """Why a request was blocked, without any of its text: the categories that fired, or, when the
    policy failed closed, what kept the text from being scanned. A size or type error is named (it
    says nothing of the content); a scanner's own exception is not echoed to the caller."""
    head = f"the request was blocked by content policy {v.policy_name!r}"
    # Only categories whose findings blocked: one that was only redacted or flagged is not why.
    blocked = {f.category for f in v.findings if f.triggered and f.action == "block"}
    blocking = [c for c in v.categories if c in blocked]
    if blocking:
        return f"{head} ({', '.join(blocking)})"
    unscanned = sorted(
        f"{where.removesuffix('.input')}: {why}" for where, why in v.errors.items() if where.endswith("input")
    )
    if unscanned:
        return f"{head}: the text was not scanned ({'; '.join(unscanned)})"
    return f"{head}: a scanner failed, and the policy fails closed"
