"""Redaction: reversible pseudonyms (per-request vault), masks, or keyed hashes.

Pseudonyms keep the model useful ("write to <EMAIL_ADDRESS_1>" still reads as an instruction about an
address) and let the gateway restore the real values in the answer for the caller, when the policy
allows it; the vault lives only as long as the request. Hashes are keyed (HMAC) so that a stored
payload cannot be reversed by hashing guesses, yet the same value hashes the same within a tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Literal

from .types import Finding, Span

__all__ = ["RedactionMode", "Vault", "redact", "redact_many"]

RedactionMode = Literal["pseudonym", "mask", "hash"]


class Vault:
    """Pseudonym <-> original value for one request. The same value always gets the same pseudonym."""

    def __init__(self) -> None:
        self._by_value: dict[tuple[str, str], str] = {}
        self._by_token: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def pseudonym(self, entity: str, value: str) -> str:
        key = (entity, value)
        token = self._by_value.get(key)
        if token is None:
            self._counts[entity] = self._counts.get(entity, 0) + 1
            token = f"<{entity}_{self._counts[entity]}>"
            self._by_value[key] = token
            self._by_token[token] = value
        return token

    def __len__(self) -> int:
        return len(self._by_token)

    def restore(self, text: str) -> str:
        """Put the original values back wherever a pseudonym of this vault appears."""
        if not self._by_token:
            return text
        pattern = re.compile("|".join(re.escape(t) for t in sorted(self._by_token, key=len, reverse=True)))
        return pattern.sub(lambda m: self._by_token[m.group()], text)

    def tokens(self) -> list[str]:
        return list(self._by_token)


def _merge(spans: Iterable[tuple[Span, str, RedactionMode]]) -> list[tuple[Span, str, RedactionMode]]:
    out: list[tuple[Span, str, RedactionMode]] = []
    for span, entity, mode in sorted(spans, key=lambda x: (x[0].start, -x[0].end)):
        if out and span.start < out[-1][0].end:
            prev, prev_entity, prev_mode = out[-1]
            # Overlap: one replacement covering both; a mask beats a pseudonym (never reversible).
            keep = prev_mode if prev_mode != "pseudonym" else mode
            out[-1] = (Span(prev.start, max(prev.end, span.end)), prev_entity, keep)
        else:
            out.append((span, entity, mode))
    return out


def redact(
    text: str,
    findings: Iterable[Finding],
    mode: RedactionMode = "pseudonym",
    vault: Vault | None = None,
    hash_key: bytes = b"steward",
) -> str:
    """`text` with every span of `findings` replaced; overlapping spans are merged first."""
    return redact_many(text, [(f, mode) for f in findings], vault, hash_key)


def redact_many(
    text: str,
    items: Iterable[tuple[Finding, RedactionMode]],
    vault: Vault | None = None,
    hash_key: bytes = b"steward",
) -> str:
    """Like `redact`, with a redaction mode per finding (secrets masked, names pseudonymised)."""
    spans = _merge(
        (Span(max(0, s.start), min(len(text), s.end)), f.entity, m)
        for f, m in items
        for s in f.spans
        if s.end > s.start
    )
    pieces: list[str] = []
    pos = 0
    for span, entity, mode in spans:
        if mode == "pseudonym" and vault is None:
            raise ValueError("pseudonym redaction needs a vault to restore from")
        pieces.append(text[pos : span.start])
        value = text[span.start : span.end]
        if mode == "pseudonym":
            assert vault is not None
            pieces.append(vault.pseudonym(entity, value))
        elif mode == "mask":
            pieces.append(f"[{entity}]")
        else:
            digest = hmac.new(hash_key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
            pieces.append(f"<{entity}:{digest[:12]}>")
        pos = span.end
    pieces.append(text[pos:])
    return "".join(pieces)
