"""The scanner seam: one protocol for every detector, and a registry that policies name them from.

A scanner turns a normalised `Document` into findings; it does not decide actions (the policy
does), so the same detector serves a tenant that blocks PII and one that only flags it. Scanners
that share expensive work (the encoder pass) do it through `Document.cache`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .normalize import Document
from .types import Category, Finding, ScanContext, Span

__all__ = [
    "CONTAIN_MARGIN",
    "QUASI_SUBTYPE",
    "Match",
    "PatternDetector",
    "Registry",
    "Scanner",
    "ascii_fold",
    "default_registry",
    "may_contain",
    "resolve_overlaps",
]

# The characters that `re.IGNORECASE` equates with an ASCII letter but `str.lower()` does not turn
# into it: capital I with dot (lowercased to "i" + a combining dot), dotless i, long s. Checked over
# every code point in tests/guard/test_detectors.py.
_ASCII_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s"})


def ascii_fold(text: str) -> str:
    """`text` lowercased so that wherever a case-insensitive regex matches an ASCII word, the
    lowercase word is a substring of the result (one character in, one character out for every
    character that matches an ASCII letter). A substring test on it is then a necessary condition
    for a match: a cheap gate in front of a slow case-insensitive pattern."""
    return text.translate(_ASCII_FOLD).lower()


def may_contain(text: str, literals: Iterable[str], folded: str | None = None) -> bool:
    """Whether any of `literals` occurs in `text` (or in `folded`, its `ascii_fold`, when given)."""
    hay = text if folded is None else folded
    return any(w in hay for w in literals)


@runtime_checkable
class Scanner(Protocol):
    """Anything that finds problems in text. `category` is the category its findings carry.

    A scanner may also have `entities`, the set of `Finding.entity` names it can report (with the
    options it was built with); otherwise its registry entry may declare them. Policies check their
    `entity_actions` keys against that set, so a misspelt entity is a load error.
    """

    name: str
    category: Category

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        """Findings for `doc`, with spans in the original text's offsets."""
        ...


@dataclass(frozen=True, slots=True)
class Match:
    """A detector's raw hit in the text it was given (normalised or decoded), before mapping."""

    start: int
    end: int
    score: float
    reason: str
    entity: str
    subtype: str | None = None


class PatternDetector(Protocol):
    """One entity type (email, IBAN, ...): a small class behind the PII/secrets scanners."""

    entity: str

    def detect(self, text: str) -> Iterable[Match]:
        """Hits in `text`, offsets into `text`."""
        ...


# `Match.subtype` of a quasi-identifier (pii.QUASI): flagged by default, not redacted.
QUASI_SUBTYPE = "quasi_identifier"
# How much less confident a longer match may be than the shorter ones it contains and still win: a
# street address (0.85) over the titled name inside it (0.9), not a phone number (0.85) over a
# Luhn-valid card (0.95).
CONTAIN_MARGIN = 0.05


def resolve_overlaps(matches: list[Match], text: str | None = None) -> list[Match]:
    """One reading for each stretch of text: the most confident of overlapping matches (longer wins
    a tie), in text order, with no part of a direct identifier left unreported.

    A Luhn-valid card also looks like a phone number and a date of birth is also a date: the
    more specific, better-evidenced reading should be the one reported and redacted. But when the
    winner is the shorter one, dropping the other leaves the rest of it in clear: "12 Dr Martin
    Luther Blvd" is a street address whose "Dr Martin Luther" also reads as a titled PERSON (0.9
    against 0.85), and only the person part was redacted. So, as Presidio's anonymizer does (a
    result contained in another is dropped; intersecting ones are trimmed), a direct-identifier
    match that contains the better ones wins over them when it is within `CONTAIN_MARGIN` of their
    scores (the whole address, labelled as one), and otherwise the parts of it that no better match
    covers are kept as matches of their own (trimmed, and only when `text` shows they hold a letter
    or digit), so every character of it is still reported. Quasi-identifiers neither displace nor
    split a better match: they are flagged, not redacted, so losing one exposes nothing.
    """
    order = sorted(matches, key=lambda m: (-m.score, -(m.end - m.start), m.start))
    kept: list[Match] = []
    if any(m.end <= m.start for m in matches):  # empty spans: the plain pairwise test
        for m in order:
            if all(m.end <= k.start or m.start >= k.end for k in kept):
                kept.append(m)
        return sorted(kept, key=lambda m: m.start)
    # Non-empty spans: the kept ones are disjoint, so kept in text order both their starts and their
    # ends increase, and the ones a candidate overlaps are a slice found by bisection: from the
    # first that ends after the candidate's start to the last that starts before its end.
    starts: list[int] = []
    ends: list[int] = []
    for m in order:
        lo = bisect.bisect_right(ends, m.start)
        hi = bisect.bisect_left(starts, m.end)
        if lo >= hi:
            new = [m]
        elif m.subtype == QUASI_SUBTYPE:
            continue
        elif all(
            m.start <= k.start
            and k.end <= m.end
            and (k.start, k.end) != (m.start, m.end)
            and round(k.score - m.score, 6) <= CONTAIN_MARGIN
            for k in kept[lo:hi]
        ):
            new = [m]
        else:
            new = sorted(kept[lo:hi] + _uncovered(m, kept[lo:hi], text), key=lambda k: k.start)
        kept[lo:hi] = new
        starts[lo:hi] = [k.start for k in new]
        ends[lo:hi] = [k.end for k in new]
    return kept


def _uncovered(m: Match, better: list[Match], text: str | None) -> list[Match]:
    """The parts of `m` outside `better` (disjoint, in text order) that hold a letter or digit,
    trimmed of spaces, as matches of `m`'s kind."""
    pieces: list[Match] = []
    pos = m.start
    for lo, hi in [(k.start, k.end) for k in better] + [(m.end, m.end)]:
        start, end = pos, min(lo, m.end)
        pos = max(pos, hi)
        if text is not None:
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
            if not any(c.isalnum() for c in text[start:end]):
                continue
        if start < end:
            pieces.append(Match(start, end, m.score, m.reason, m.entity, m.subtype))
    return pieces


def scan_with_detectors(
    doc: Document,
    detectors: Iterable[PatternDetector],
    *,
    category: Category,
    scanner: str,
) -> list[Finding]:
    """Run pattern detectors over the normalised text and every decoded segment; map to original."""
    detectors = list(detectors)
    findings: list[Finding] = []
    main = resolve_overlaps([m for d in detectors for m in d.detect(doc.text)], doc.text)
    for m in main:
        findings.append(
            Finding(
                category=category,
                entity=m.entity,
                score=m.score,
                spans=[doc.to_original(m.start, m.end)],
                reason=m.reason,
                scanner=scanner,
                subtype=m.subtype,
            )
        )
    for seg in doc.segments:
        for m in resolve_overlaps([m for d in detectors for m in d.detect(seg.text)], seg.text):
            findings.append(
                Finding(
                    category=category,
                    entity=m.entity,
                    score=m.score,
                    spans=[Span(seg.origin.start, seg.origin.end)],
                    reason=f"{m.reason} (inside {seg.kind}-encoded text)",
                    scanner=scanner,
                    subtype=m.subtype,
                    decoded=True,
                )
            )
    return findings


ScannerFactory = Callable[[Mapping[str, Any]], Scanner]


class Registry:
    """Scanner names -> factories; a policy that names an unknown scanner fails validation."""

    def __init__(self) -> None:
        self._factories: dict[str, ScannerFactory] = {}
        self._entities: dict[str, frozenset[str]] = {}

    def register(self, name: str, factory: ScannerFactory, entities: Iterable[str] | None = None) -> None:
        """Add a scanner. `entities`: the entity names it reports, for scanners that do not say so
        themselves (an `entities` attribute on the scanner wins)."""
        if name in self._factories:
            raise ValueError(f"scanner {name!r} is already registered")
        self._factories[name] = factory
        if entities is not None:
            self._entities[name] = frozenset(entities)

    def entities(self, name: str, scanner: Scanner | None = None) -> frozenset[str] | None:
        """The entity names scanner `name` can report: `scanner.entities` when the instance has
        them (they may depend on its options), else what its registration declared; None when
        neither says."""
        own = getattr(scanner, "entities", None)
        if isinstance(own, (set, frozenset)):
            return frozenset(own)
        return self._entities.get(name)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> Scanner:
        try:
            factory = self._factories[name]
        except KeyError:
            raise LookupError(f"unknown scanner {name!r}; known: {', '.join(self.names())}") from None
        return factory(dict(options or {}))


def default_registry() -> Registry:
    """Every built-in scanner. Classifier scanners load the trained heads lazily, on first scan."""
    from .classifier import ClassifierScanner
    from .context_rules import ContextProbeScanner
    from .injection_rules import InjectionRulesScanner
    from .leak import PromptLeakScanner
    from .pii import PIIScanner
    from .secrets import SecretsScanner

    reg = Registry()
    # pii and secrets carry their own `entities`; the others report fixed names, declared here and
    # checked against what they emit in tests/guard/test_detectors.py.
    reg.register("pii", lambda o: PIIScanner(**o))
    reg.register("secrets", lambda o: SecretsScanner(**o))

    def classifier(category: str) -> ScannerFactory:
        return lambda o: ClassifierScanner(category, **o)

    for cat in ("prompt_injection", "jailbreak", "harmful", "toxicity"):
        reg.register(cat, classifier(cat), entities=[cat.upper()])
    reg.register(
        "prompt_leak", lambda o: PromptLeakScanner(**o), entities=["CANARY", "SYSTEM_PROMPT_OVERLAP"]
    )
    reg.register("injection_rules", lambda o: InjectionRulesScanner(**o), entities=["PROMPT_INJECTION"])
    reg.register(
        "context_probe",
        lambda o: ContextProbeScanner(**o),
        entities=["SECRET_PROBE", "PRIVATE_RECORD_PROBE"],
    )
    return reg
