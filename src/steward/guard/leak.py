"""System-prompt leakage in answers: the gateway's canary token, or long overlap with the prompt.

A canary (a random token the gateway plants in the system prompt) is proof of a leak when it shows up
in an answer, in any disguise that keeps its letters and digits: upper-cased, split by zero-width or
other characters, fullwidth, or base64/hex-encoded. It is matched on the normalised text and on every
decoded segment, case-folded with everything but letters and digits removed.

Paraphrased leaks have no canary, so the answer is also compared with the system prompt by word
n-grams (5 words by default). An n-gram of the prompt counts as repeated when its words appear in the
answer in order with at most `max_gap` other words between two consecutive ones, so a leak padded with
filler words ("um" after every word) still matches, and it is looked for in the normalised text and
in every decoded base64/hex segment. The score is the share of the prompt's n-grams repeated (out of
at most 40), but it stays 0 below an absolute minimum of evidence (`min_shared` n-grams, about twelve
consecutive words, or the whole prompt when it is shorter). Two kinds of text are not evidence:

* text the system prompt tells the model to say (a mandated greeting, sign-off or disclaimer): the
  object of a say-verb, quoted right after it or after a colon ('say: ...', 'end every answer with
  this sentence: ...', 'greet the customer with "..."', 'sign off with: ...'); every compliant answer
  repeats it. Text after "use/follow/include ...:" and quoted notes that no say-verb introduces stay
  evidence: that is where prompts keep their secrets;
* a prompt of fewer than `min_prompt_grams` n-grams (a stock line like "You are a helpful
  assistant."): so common a phrase proves nothing, and the canary covers it.

Streams: a stream's windows are scanned one at a time, so the gateway's `StreamGuard` passes one
mutable state per stream under `STREAM_STATE_KEY` in `Document.cache`; the n-grams repeated in each
window are added to it and the score is that of everything the stream has said so far. A prompt
leaked in pieces spread over many windows is therefore judged as the whole answer would be.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .normalize import Document
from .types import Category, Finding, ScanContext, Span

__all__ = ["STREAM_STATE_KEY", "PromptLeakScanner"]

# `Document.cache` key of a stream's accumulated evidence: a dict the stream keeps for its lifetime.
STREAM_STATE_KEY = "prompt_leak.stream"

_TOKEN = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"[\u4e00-\u9fff]")
_NOT_ALNUM = re.compile(r"[\W_]+", re.UNICODE)
_CANARY_RANDOM = re.compile(r"([0-9a-f]{8,})$")
_DENOMINATOR_CAP = 40  # a prompt's share is counted out of at most this many n-grams
_JOINED_MIN = 12  # an n-gram run together must be at least this many characters to count

# Text the system prompt tells the model to say: the object of a say-verb ("say", "reply/respond ...
# with", "end/begin/start/open/close/finish/conclude ... with", "sign off", "greet ... with",
# "prefix/preface ... with"), either quoted right after it or after a colon, up to the end of the
# sentence (at most `_SPOKEN_MAX` characters). Nothing else is excluded: text after "use/follow/apply/
# include/remember ...:" or "policy/rules/instructions:" is what a prompt keeps secret, and so are quoted
# notes that no say-verb introduces.
_SPOKEN_MAX = 400
_QUOTED = re.compile(
    r'"([^"\n]{2,400})"|“([^”\n]{2,400})”|«([^»\n]{2,400})»|`([^`\n]{2,400})`'
    r"|‘([^’\n]{2,400})’|(?<!\w)'([^'\n]{2,400}?)'(?!\w)"
)
_WITH_VERBS = (
    r"reply|respond|end|begin|start|open|close|finish|conclude|greet|prefix|preface"  # ... with "..."
)
# Words that make the clause an instruction (or a secret) rather than the object of the say-verb.
_NOT_OBJECT = (
    r"use|using|follow|apply|include|including|consider|know|remember|polic(?:y|ies)|rules?|"
    r"instructions?|guidelines?|internal|confidential|secret|private|and|then|but|or|if|when|while"
)
_WORDS_UP_TO_4 = rf"(?:\s+(?!(?:{_NOT_OBJECT})\b)\w[\w'’-]*){{0,4}}?"
_DIRECTIVE = re.compile(
    rf"\b(?:say|sign[\s-]+off|(?:{_WITH_VERBS}){_WORDS_UP_TO_4}\s+with){_WORDS_UP_TO_4}"
    r"(?:\s*(?P<colon>:)\s*|\s*(?=[\"“«`‘']))",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?][\"'”’)]?(?=\s|$)|\n")
_NEGATED = re.compile(r"\b(?:never|not|don't|dont|no|nor|without|avoid)(?:\s+\w+){0,2}\s*$", re.IGNORECASE)


def _words(text: str) -> list[str]:
    # CJK text has no spaces: treat each ideograph as a word so n-grams still mean something.
    return [w for t in _TOKEN.findall(text.casefold()) for w in (list(t) if _CJK.search(t) else [t])]


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _spoken_spans(system: str) -> list[tuple[int, int]]:
    """Character ranges of `system` that it tells the model to say: the quoted or colon-introduced
    object of a say-verb."""
    spans: list[tuple[int, int]] = []
    for m in _DIRECTIVE.finditer(system):
        head = system[max(0, m.start() - 80) : m.start()]
        if _NEGATED.search(head):
            continue  # "never say ...": what follows is what must not be said
        quoted = _QUOTED.match(system, m.end())
        if quoted:
            spans.append(quoted.span())
        elif m.group("colon"):
            end = _SENTENCE_END.search(system, m.end())
            stop = end.end() if end else len(system)
            if stop - m.end() <= _SPOKEN_MAX:
                spans.append((m.end(), stop))
    return spans


@dataclass(frozen=True, slots=True)
class _Prompt:
    """A system prompt prepared for matching: its n-grams outside spoken text, indexed."""

    grams: frozenset[tuple[str, ...]]
    vocab: frozenset[str]
    by_first: dict[str, list[tuple[str, ...]]]
    joined: dict[str, tuple[str, ...]]  # each n-gram's letters and digits run together -> n-gram


@functools.lru_cache(maxsize=256)
def _prompt(system: str, n: int) -> _Prompt:
    spans = sorted(_spoken_spans(system))
    pieces: list[str] = []
    pos = 0
    for a, b in spans:
        if a > pos:
            pieces.append(system[pos:a])
        pos = max(pos, b)
    pieces.append(system[pos:])
    grams: set[tuple[str, ...]] = set()
    for piece in pieces:  # n-grams never bridge a removed span
        grams |= _grams(_words(piece), n)
    by_first: dict[str, list[tuple[str, ...]]] = {}
    for g in sorted(grams):
        by_first.setdefault(g[0], []).append(g)
    joined = {k: g for g in grams if len(k := _fold("".join(g))) >= _JOINED_MIN}
    return _Prompt(frozenset(grams), frozenset(w for g in grams for w in g), by_first, joined)


def _repeated(prompt: _Prompt, words: list[str], n: int, max_gap: int, enough: int) -> set[tuple[str, ...]]:
    """The prompt's n-grams whose words appear in `words` in order, at most `max_gap` words apart;
    stops looking once `enough` are found."""
    found = set(prompt.grams & _grams(words, n))
    if max_gap <= 0 or len(found) >= enough:
        return found
    size = len(words)
    at: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        if w in prompt.vocab:
            at.setdefault(w, []).append(i)
    steps = range(1, max_gap + 2)
    candidates = (g for w in at for g in prompt.by_first.get(w, ()) if g not in found)
    for gram in candidates:
        if any(w not in at for w in gram[1:]):
            continue
        reach = set(at[gram[0]])
        for w in gram[1:]:
            nxt = at[w]
            if len(reach) * len(steps) <= len(nxt):
                reach = {q + d for q in reach for d in steps if q + d < size and words[q + d] == w}
            else:
                reach = {p for p in nxt if any(p - d in reach for d in steps)}
            if not reach:
                break
        if reach:
            found.add(gram)
            if len(found) >= enough:
                break
    return found


def _fold(text: str) -> str:
    return _NOT_ALNUM.sub("", text.casefold())


def _joined(prompt: _Prompt, text: str) -> set[tuple[str, ...]]:
    """The prompt's n-grams found in `text` with everything but letters and digits removed: words
    run together ("youarezeta...") or spelled out letter by letter ("Y o u a r e")."""
    folded = _fold(text)
    if len(folded) < _JOINED_MIN:
        return set()
    heads = {folded[i : i + _JOINED_MIN] for i in range(len(folded) - _JOINED_MIN + 1)}
    return {g for k, g in prompt.joined.items() if k[:_JOINED_MIN] in heads and k in folded}


def _find_folded(text: str, key: str) -> tuple[int, int] | None:
    """[start, end) in `text` of `key` matched case-folded with non-alphanumerics skipped."""
    if key not in _fold(text):
        return None
    chars: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        for c in ch.casefold():
            if c.isalnum():
                chars.append(c)
                index.append(i)
    k = "".join(chars).find(key)
    return (index[k], index[k + len(key) - 1] + 1) if k >= 0 else None


class PromptLeakScanner:
    """Output scanner; needs `ScanContext.canary` and/or `ScanContext.system_prompt`."""

    name = "prompt_leak"
    category: Category = "prompt_leak"

    def __init__(
        self, ngram: int = 5, min_shared: int = 8, min_prompt_grams: int = 4, max_gap: int = 2
    ) -> None:
        if ngram < 2:
            raise ValueError(f"prompt_leak: ngram must be at least 2, got {ngram}")
        if min_shared < 1 or min_prompt_grams < 1 or max_gap < 0:
            raise ValueError("prompt_leak: min_shared and min_prompt_grams must be >= 1, max_gap >= 0")
        self.ngram = ngram
        self.min_shared = min_shared
        self.min_prompt_grams = min_prompt_grams
        self.max_gap = max_gap

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        findings: list[Finding] = []
        if ctx.canary:
            span = self._canary(doc, ctx.canary)
            if span is not None:
                findings.append(
                    Finding(
                        "prompt_leak",
                        "CANARY",
                        1.0,
                        [span],
                        "the system prompt's canary token appears",
                        scanner=self.name,
                    )
                )
        if ctx.system_prompt:
            finding = self._overlap(doc, ctx.system_prompt)
            if finding is not None:
                findings.append(finding)
        return findings

    def _canary(self, doc: Document, canary: str) -> Span | None:
        i = doc.original.find(canary)
        if i >= 0:
            return Span(i, i + len(canary))
        folded = _fold(canary)
        keys = [folded] if folded else []
        random_part = _CANARY_RANDOM.search(folded)
        if random_part and random_part.group(1) != folded:
            keys.append(random_part.group(1))  # the random hex alone is proof enough
        for key in keys:
            hit = _find_folded(doc.text, key)
            if hit is not None:
                return doc.to_original(*hit)
            for seg in doc.segments:
                if key in _fold(seg.text):
                    return seg.origin
        return None

    def _overlap(self, doc: Document, system: str) -> Finding | None:
        prompt = _prompt(system, self.ngram)
        total = len(prompt.grams)
        if not total:
            return None
        denominator = min(total, _DENOMINATOR_CAP)
        texts: Iterable[str] = [doc.text, *(s.text for s in doc.segments)]
        found: set[tuple[str, ...]] = set()
        for text in texts:
            found |= _repeated(prompt, _words(text), self.ngram, self.max_gap, denominator)
            if len(found) < denominator:
                found |= _joined(prompt, text)
        state = doc.cache.get(STREAM_STATE_KEY)
        so_far = ""
        if isinstance(state, dict):  # a stream: everything it has said so far counts
            seen = state.setdefault((self.name, self.ngram, self.max_gap, system), set())
            seen |= found
            found = seen
            so_far = " so far in this stream"
        shared = len(found)
        if not shared:
            return None
        need = min(self.min_shared, total)
        if total < self.min_prompt_grams or shared < need:
            score = 0.0
            why = (
                f"the system prompt has only {total} word {self.ngram}-grams (the canary covers it)"
                if total < self.min_prompt_grams
                else f"under the minimum of {need}"
            )
        else:
            score = min(1.0, shared / denominator)
            why = f"of {total}"
        return Finding(
            "prompt_leak",
            "SYSTEM_PROMPT_OVERLAP",
            score,
            [Span(0, len(doc.original))],
            f"{shared} of the system prompt's word {self.ngram}-grams repeated{so_far} ({why})",
            scanner=self.name,
        )
