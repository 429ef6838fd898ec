"""Canonicalise text before scanning, keeping a map back to the original offsets.

Attackers hide payloads from pattern matchers and classifiers with look-alike characters
(fullwidth letters, Cyrillic 'а' in "pаssword"), invisible characters (zero-width joiners, Unicode
tag characters that smuggle ASCII), and encodings (base64, hex). Scanners therefore see:

* the *normalised* text: NFKC per character, invisible characters removed, homoglyphs folded to
  Latin inside words that already contain Latin letters (so Russian or Greek prose is untouched);
* *decoded segments*: base64/hex runs that decode to readable text; words written with the escapes of
  URLs, HTML and string literals (`jane.doe%40example.org`, `&#64;`, `\u0040`); and the ASCII hidden in tag
  characters (one segment per run of them; likewise bytes smuggled in runs of variation selectors),
  each tied to the span of original text it came from. Every run is decoded (no cap on
  how many, so harmless decoy runs cannot crowd out the one that carries a payload), and decoded
  text is searched for runs again, up to `MAX_DECODE_DEPTH` layers (base64 of base64, hex inside
  base64, base64 in tag characters). A layer of base64 is 3/4 the length of its source and one of
  hex 1/2, so the decoded text of all layers stays within a small multiple of the text: the cost
  is bounded by the text's length, not by a count. Runs still encoded below the last layer are
  counted in `Document.undecoded`, so a deeper payload is visible rather than silently unread.

Every normalised character remembers the original index it came from, so a finding is always
reported in the caller's offsets, never in an internal representation.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from .types import Span

__all__ = ["Document", "Segment", "normalise"]

# Zero-width and formatting characters that render as nothing; soft hyphen; BOM; bidi controls;
# the combining grapheme joiner; the Hangul fillers (U+3164 and U+FFA0 become U+1160 under NFKC);
# variation selectors. NFKC keeps all of these, and one inside a value ("4111\ufe0f1111...",
# "jo\u034fhn@...") splits it for every pattern while the reader sees the value whole.
_INVISIBLE = frozenset(
    [
        *(0x00AD, 0x034F, 0x115F, 0x1160, 0x180E, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F),
        *(0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0x3164, 0xFEFF, 0xFFA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
)
_TAG_LO, _TAG_HI = 0xE0000, 0xE007F
# Variation selectors VS1-16 and VS17-256. One after an emoji or an ideograph picks a glyph and
# carries nothing; a run of them is the "emoji smuggling" trick, one byte per selector (byte b < 16
# is U+FE00 + b, else U+E0100 + b - 16), read back like the ASCII hidden in tag characters.
_VS_LO, _VS_HI, _VS_SUP_LO, _VS_SUP_HI = 0xFE00, 0xFE0F, 0xE0100, 0xE01EF

# Cyrillic and Greek letters that look like Latin ones (Unicode confusables, the common subset).
_HOMOGLYPHS = {
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ո": "n",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
    "Т": "T", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S",
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i", "κ": "k", "τ": "t", "υ": "u", "ϲ": "c",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
}  # fmt: skip

_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
# Eight or more hex pairs, optionally separated; the run ends on a pair, never on a separator.
_HEX_RUN = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){7,}[0-9A-Fa-f]{2}(?![0-9A-Fa-f])")
_WORD = re.compile(r"\w+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_HOMOGLYPH_CHAR = re.compile("[" + "".join(_HOMOGLYPHS) + "]")

# Layers of encoding read: a run inside decoded text is decoded again, down to this many layers.
MAX_DECODE_DEPTH = 3


@dataclass(slots=True)
class Segment:
    """Text decoded from part of the original (base64, hex, tag characters).

    Findings inside it map to `origin`, the whole span of original text it was decoded from; for
    nested encodings that is the outermost run. `kind` names the layers, outermost first
    ("base64", "base64+hex", "unicode_tags+base64").
    """

    text: str
    origin: Span
    kind: str


@dataclass(slots=True)
class Document:
    """One text prepared for scanning, shared by all scanners of one request.

    `cache` lets expensive shared work (the encoder pass, the classifier probabilities) happen once
    per document whichever scanner asks first. `undecoded` counts encoded runs found inside the
    last decoded layer (`MAX_DECODE_DEPTH`) and not read: non-zero means part of the text was not
    scanned in clear.
    """

    original: str
    text: str
    offsets: list[int]
    segments: list[Segment] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    undecoded: int = 0

    def to_original(self, start: int, end: int) -> Span:
        """Map a [start, end) range of the normalised text to the original text."""
        if not self.offsets or start >= end:
            pos = self.offsets[start] if start < len(self.offsets) else len(self.original)
            return Span(pos, pos)
        start = max(0, min(start, len(self.offsets) - 1))
        last = max(start, min(end - 1, len(self.offsets) - 1))
        return Span(self.offsets[start], self.offsets[last] + 1)


def _is_latin_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _printable_ratio(text: str) -> float:
    if not text:
        return 0.0
    good = sum(1 for c in text if c.isprintable() or c in "\n\r\t")
    return good / len(text)


def _readable(decoded: str) -> bool:
    """Decoded text worth scanning as text: mostly letters and spaces."""
    return sum(c.isalpha() or c.isspace() for c in decoded) >= 0.4 * len(decoded)


def _decode_base64(run: str) -> str | None:
    """The printable UTF-8 text a base64 run encodes, or None (readable or not: see `_decode_all`)."""
    body = run.rstrip("=")
    if len(body) < 16 or body.isdigit() or body.isalpha():
        return None  # plain words or numbers are not worth decoding
    padded = body + "=" * (-len(body) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded) if ("-" in body or "_" in body) else base64.b64decode(padded)
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return decoded if _printable_ratio(decoded) >= 0.95 else None


def _decode_hex(run: str) -> str | None:
    """The printable UTF-8 text a hex run encodes, or None."""
    digits = re.sub(r"[ :]", "", run)
    try:
        decoded = bytes.fromhex(digits[: len(digits) // 2 * 2]).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded if _printable_ratio(decoded) >= 0.95 else None


# Words written with the escapes of URLs, HTML and string literals: ordinary spellings of text, not
# obfuscation, but a pattern matcher reads "jane.doe%40example.org" as no e-mail address. A run is
# one whitespace-delimited word holding at least one escape; it may start only at a word's start,
# so a long word without one is passed over in linear time.
_PERCENT_RUN = re.compile(r"(?<!\S)[^\s%]*(?:%[0-9A-Fa-f]{2}[^\s%]*)+")
_ENTITY_RUN = re.compile(
    r"(?<!\S)[^\s&]*(?:&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});[^\s&]*)+"
)
_ESCAPE_RUN = re.compile(r"(?<!\S)[^\s\\]*(?:\\(?:u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2})[^\s\\]*)+")
_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})|\\x([0-9A-Fa-f]{2})")


# Their segments are read by the pattern detectors (PII, secrets) and the leak check, not by the
# classifiers: such words are everyday text (a tweet's `&amp;`, a link's `%20`; 1,188 of the
# 22,309 training examples hold one) that the classifiers read well as written, and a second
# reading would cost encoder time and move their scores for nothing.
TEXT_ESCAPE_KINDS = frozenset({"percent", "entity", "escape"})


def _decode_percent(run: str) -> str | None:
    from urllib.parse import unquote

    try:
        decoded = unquote(run, errors="strict")
    except UnicodeDecodeError:  # bytes that are not UTF-8: nothing readable was hidden
        return None
    return decoded if decoded != run and _printable_ratio(decoded) >= 0.95 else None


def _decode_entities(run: str) -> str | None:
    decoded = html.unescape(run)
    return decoded if decoded != run and _printable_ratio(decoded) >= 0.95 else None


def _decode_escapes(run: str) -> str | None:
    decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), run)
    return decoded if decoded != run and _printable_ratio(decoded) >= 0.95 else None


_DECODERS = (
    (_BASE64_RUN, _decode_base64, "base64", None),
    (_HEX_RUN, _decode_hex, "hex", None),
    (_PERCENT_RUN, _decode_percent, "percent", "%"),
    (_ENTITY_RUN, _decode_entities, "entity", "&"),
    (_ESCAPE_RUN, _decode_escapes, "escape", "\\"),
)


def _runs(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, decoded text, kind) of every run in `text` that decodes to printable text."""
    found = []
    for pattern, decoder, kind, needs in _DECODERS:
        if needs is not None and needs not in text:
            continue
        for m in pattern.finditer(text):
            decoded = decoder(m.group())
            if decoded:
                found.append((m.start(), m.end(), decoded, kind))
    return found


def _decode_all(doc: Document, hidden: list[Segment]) -> None:
    """Fill `doc.segments` with every decoded run, layer by layer, down to `MAX_DECODE_DEPTH`.

    A decoded run becomes a segment when it is readable. Any printable decoded text is searched
    again for runs, so an intermediate layer that is itself an encoding (hex digits, a base64
    string) is peeled off even though it is not readable. Nested segments keep the origin of the
    outermost run, exactly as one layer maps to the run it was decoded from.
    """
    # (text, its origin, its kind) of one layer; layer 0 is the normalised text (origin None: each
    # run maps through `to_original`), and each run of hidden text is a first layer of its own.
    layer: list[tuple[str, Span | None, str]] = [(doc.text, None, "")]
    doc.segments.extend(hidden)
    for depth in range(1, MAX_DECODE_DEPTH + 1):
        below: list[tuple[str, Span | None, str]] = []
        for text, origin, outer in layer:
            for start, end, decoded, kind in _runs(text):
                span = doc.to_original(start, end) if origin is None else origin
                kind = f"{outer}+{kind}" if outer else kind
                if _readable(decoded):
                    doc.segments.append(Segment(decoded, span, kind))
                below.append((decoded, span, kind))
        if depth == 1:
            below.extend((h.text, h.origin, h.kind) for h in hidden)
        layer = below
        if not layer:
            return
    doc.undecoded = sum(len(_runs(text)) for text, _, _ in layer)


@dataclass(slots=True)
class _Run:
    kind: str
    start: int
    end: int
    units: list[int] = field(default_factory=list)


class _HiddenRuns:
    """Text hidden in runs of invisible carriers, one segment per contiguous run: a finding in one
    run maps to that run only, never to the visible text between two runs (a tag character at each
    end of a message must not make the whole message the span of a hidden e-mail)."""

    def __init__(self) -> None:
        self.runs: list[_Run] = []

    def add(self, kind: str, i: int, unit: int | None) -> None:
        """Character `i` of the original carries `unit` (None: a carrier with no payload)."""
        run = self.runs[-1] if self.runs else None
        if run is None or run.kind != kind or run.end != i:
            run = _Run(kind, i, i)
            self.runs.append(run)
        run.end = i + 1
        if unit is not None:
            run.units.append(unit)

    def segments(self) -> list[Segment]:
        out = []
        for run in self.runs:
            hidden: str | None = None
            if run.kind == "unicode_tags":
                hidden = "".join(map(chr, run.units))
            elif len(run.units) >= 2:  # one selector is an emoji's or an ideograph's, not a payload
                try:
                    hidden = bytes(run.units).decode("utf-8")
                except UnicodeDecodeError:
                    hidden = None
                if hidden is not None and _printable_ratio(hidden) < 0.95:
                    hidden = None
            if hidden:
                out.append(Segment(hidden, Span(run.start, run.end), run.kind))
        return out


def normalise(text: str, *, decode: bool = True) -> Document:
    """Normalise `text` and collect decoded segments; see the module docstring for the rules.

    Lone surrogates (broken Unicode from a bad decoder) are replaced by U+FFFD rather than raising,
    so junk input produces a verdict, not a crash.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    out: list[str] = []
    offsets: list[int] = []
    hidden = _HiddenRuns()
    pos = 0
    # ASCII needs none of the rules below (no ASCII character is invisible, a tag, a surrogate, a
    # format character or changed by NFKC), so ASCII runs are copied whole and only the non-ASCII
    # characters go through the per-character rules.
    for run in _NON_ASCII.finditer(text):
        start, stop = run.span()
        if start > pos:
            out.append(text[pos:start])
            offsets.extend(range(pos, start))
        pos = stop
        for i in range(start, stop):
            ch = text[i]
            cp = ord(ch)
            if cp in _INVISIBLE:
                continue
            if _TAG_LO <= cp <= _TAG_HI:
                hidden.add("unicode_tags", i, cp - 0xE0000 if 0xE0020 <= cp <= 0xE007E else None)
                continue
            if _VS_LO <= cp <= _VS_HI or _VS_SUP_LO <= cp <= _VS_SUP_HI:
                hidden.add("variation_selectors", i, cp - _VS_LO if cp <= _VS_HI else cp - _VS_SUP_LO + 16)
                continue
            if 0xD800 <= cp <= 0xDFFF:
                out.append("\ufffd")
                offsets.append(i)
                continue
            for c in unicodedata.normalize("NFKC", ch):
                if unicodedata.category(c) == "Cf" or ord(c) in _INVISIBLE:
                    continue
                out.append(c)
                offsets.append(i)
    if pos < len(text):
        out.append(text[pos:])
        offsets.extend(range(pos, len(text)))
    normalised = "".join(out)
    # Fold homoglyphs only inside words that mix them with Latin letters ("pаypal"), so genuine
    # Cyrillic/Greek text keeps its meaning for the classifiers. Homoglyphs are non-ASCII: most
    # texts have none and skip the word scan.
    if _HOMOGLYPH_CHAR.search(normalised):
        chars = list(normalised)
        for m in _WORD.finditer(normalised):
            word = m.group()
            if any(c in _HOMOGLYPHS for c in word) and any(_is_latin_letter(c) for c in word):
                for j in range(m.start(), m.end()):
                    chars[j] = _HOMOGLYPHS.get(chars[j], chars[j])
        normalised = "".join(chars)
    doc = Document(original=text, text=normalised, offsets=offsets)
    if decode:
        _decode_all(doc, hidden.segments())
    else:
        doc.segments.extend(hidden.segments())
    return doc
