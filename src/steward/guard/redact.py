"""Redaction: reversible pseudonyms (per-request vault), masks, or keyed hashes.

Pseudonyms keep the model useful ("write to <EMAIL_ADDRESS_1>" still reads as an instruction about an
address) and let the gateway restore the real values in the answer for the caller, when the policy
allows it; the vault lives only as long as the request. Hashes are keyed (HMAC-SHA256) with a
secret of the deployment (`load_hash_key`: `$STEWARD_DATA_DIR/keys/guard-hash.key`, created on first
use; replicas sharing a store share the file as they share the KEK) so that a token cannot be
reversed by hashing guesses (an SSN has 10^9 values: a public key would give it back in seconds),
yet the same value hashes the same across requests and restarts. Without a key (a library caller,
`steward scan`) a random key of the process is used: tokens agree within the process only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from .types import Finding, Span

HASH_KEY_FILE = "guard-hash.key"
_PROCESS_HASH_KEY = secrets.token_bytes(32)


def load_hash_key(keys_dir: Path) -> bytes:
    """The deployment's hash-redaction key in `keys_dir`, created (32 random bytes, mode 0600) if
    missing. Written whole to a private temporary file, synced, then linked into place, so that the
    file exists only complete (a crash never leaves an empty key behind) and two workers starting at
    once both read the one that won. A key file others can read is refused, as the audit keys are."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = keys_dir / HASH_KEY_FILE
    if not path.exists():
        tmp = keys_dir / f".{HASH_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another worker's key won
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(
            f"{path}: the hash-redaction key is readable by others (mode {mode:o}); chmod 600 it"
        )
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"{path}: the hash-redaction key must be at least 32 bytes")
    return key


__all__ = [
    "CALL_RESTORABLE",
    "RESTORABLE",
    "RedactionMode",
    "Vault",
    "placeholder_hold",
    "redact",
    "redact_many",
]

RedactionMode = Literal["pseudonym", "mask", "hash"]


# Placeholder shapes a model may write for `<ENTITY_n>`: any case, spaces inside the brackets, a space
# for an underscore, markdown (`\<`, `\_`) or HTML (`&lt;`) escapes; or bare and upper-case (`PERSON_1`).
_NAME = r"[A-Za-z][A-Za-z0-9]*(?:\\?[_ ][A-Za-z][A-Za-z0-9]*)*"
_PLACEHOLDER = re.compile(
    rf"(?:\\?<|&lt;)\s*(?P<name>{_NAME})\\?[_ ](?P<num>\d+)\s*(?:\\?>|&gt;)"
    r"|(?<![\w\\])(?P<bare>[A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*)_(?P<bnum>\d+)(?!\w)"
)
# The same shapes in decoded text that is not markdown (the strings of JSON tool-call arguments): a
# backslash before a token is the text's own (`C:\<PERSON_1>` is a Windows path, not an escaped
# bracket), and a token never spans lines (JSON leaves are scanned joined by newlines, and a token
# across two leaves must not be restored as one in the whole text but not in either leaf).
_LITERAL_NAME = r"[A-Za-z][A-Za-z0-9]*(?:[_ ][A-Za-z][A-Za-z0-9]*)*"
_LITERAL_PLACEHOLDER = re.compile(
    rf"(?:<|&lt;)[ \t]*(?P<name>{_LITERAL_NAME})[_ ](?P<num>\d+)[ \t]*(?:>|&gt;)"
    r"|(?<!\w)(?P<bare>[A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*)_(?P<bnum>\d+)(?!\w)"
)
# The roles whose values `Vault.restore` gives back by default: the caller's own turns.
RESTORABLE: frozenset[str] = frozenset({"user"})
# ...and in tool-call arguments: the caller's turns and the caller's own tool and response schemas
# (origin "schema"). A schema's values (an `enum` of team inboxes) are what the model must write
# back into a call, and the call goes to the developer's own code, which wrote the schema: a
# pseudonym left there is a value outside the tool's own enum. They are never restored in an
# answer's content, which may reach an end user (as system-prompt values never are).
CALL_RESTORABLE: frozenset[str] = frozenset({"user", "schema"})


def _key(name: str, num: str) -> tuple[str, int]:
    return re.sub(r"\\?[_ ]", "_", name).upper(), int(num)


def placeholder_hold(text: str, upto: int, floor: int = 0) -> int:
    """`upto`, or the start of a placeholder-shaped run that `upto` would split (never before
    `floor`): a stream releasing "< PERSON_1" now and " >" later could not restore it."""
    lo = max(floor, upto - 64)
    for m in _PLACEHOLDER.finditer(text, lo, min(len(text), upto + 64)):
        if m.start() < upto < m.end():
            return max(floor, m.start())
    return upto


class Vault:
    """Pseudonym <-> original value for one request. The same value always gets the same pseudonym.

    Each value remembers the roles of the turns it came from (`origin`: "user", "system",
    "document", ...). `restore` gives back only values of the caller's own user turns by default: a
    pseudonym of system-prompt or document PII (another customer's record in a RAG document, an
    escalation contact in the system prompt) stays a placeholder in the answer, whether the model
    chose to write it or the user forged it. A value typed by the user as well is the user's.
    Values of the caller's tool and response schemas (origin "schema") are restored only in
    tool-call arguments (`CALL_RESTORABLE`).

    Tokens are predictable (`<PERSON_1>`) on purpose. The model must copy them back exactly for
    restore to work, and models mangle random suffixes (`<PERSON_1_k3f9>` comes back re-cased,
    truncated or without its suffix), so unguessable tokens would break restore without adding
    safety: since only user-origin values are restored, a guessed or forged token can only return
    a value the caller itself supplied in this request. For the same reason `restore` also accepts
    small rewrites of a token (`<person_1>`, `PERSON_1`, `< PERSON_1 >`, `\\<PERSON_1\\>`).
    """

    def __init__(self) -> None:
        self._by_value: dict[tuple[str, str], str] = {}
        self._by_token: dict[str, str] = {}
        self._by_key: dict[tuple[str, int], str] = {}
        self._origins: dict[str, set[str]] = {}
        self._counts: dict[str, int] = {}

    def pseudonym(self, entity: str, value: str, origin: str = "user") -> str:
        """The token for `value`; `origin` is the role of the turn it was found in."""
        key = (entity, value)
        token = self._by_value.get(key)
        if token is None:
            self._counts[entity] = self._counts.get(entity, 0) + 1
            token = f"<{entity}_{self._counts[entity]}>"
            self._by_value[key] = token
            self._by_token[token] = value
            self._by_key[(entity.upper(), self._counts[entity])] = token
        self._origins.setdefault(token, set()).add(origin)
        return token

    def __len__(self) -> int:
        return len(self._by_token)

    def origins(self, token: str) -> frozenset[str]:
        return frozenset(self._origins.get(token, ()))

    def restore(
        self,
        text: str,
        origins: Iterable[str] = RESTORABLE,
        *,
        escape: Callable[[str], str] | None = None,
        literal: bool = False,
    ) -> str:
        """Put back the original value of every pseudonym (or slight rewrite of one) whose value
        came from a turn of one of `origins` (the caller's user turns by default); any other
        pseudonym stays as written. `escape` transforms each value put back (JSON-escaping it for
        tool-call arguments, say). `literal`: `text` is not markdown (a JSON string, or raw JSON
        arguments), so a backslash before a token is kept, never read as escaping it, and a token
        never spans a line break."""
        if not self._by_token:
            return text
        allowed = frozenset(origins)

        def put_back(m: re.Match[str]) -> str:
            if m.group("name") is not None:
                token = self._by_key.get(_key(m.group("name"), m.group("num")))
            else:
                token = self._by_key.get((m.group("bare"), int(m.group("bnum"))))
            if token is None or not (self._origins.get(token, set()) & allowed):
                return m.group()
            value = self._by_token[token]
            return escape(value) if escape is not None else value

        return (_LITERAL_PLACEHOLDER if literal else _PLACEHOLDER).sub(put_back, text)

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
    hash_key: bytes | None = None,
    origin: str = "user",
) -> str:
    """`text` with every span of `findings` replaced; overlapping spans are merged first. `origin`
    is the role of the turn `text` is (see `Vault`)."""
    return redact_many(text, [(f, mode) for f in findings], vault, hash_key, origin)


def redact_many(
    text: str,
    items: Iterable[tuple[Finding, RedactionMode]],
    vault: Vault | None = None,
    hash_key: bytes | None = None,
    origin: str = "user",
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
            pieces.append(vault.pseudonym(entity, value, origin))
        elif mode == "mask":
            pieces.append(f"[{entity}]")
        else:
            key = _PROCESS_HASH_KEY if hash_key is None else hash_key
            digest = hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
            pieces.append(f"<{entity}:{digest[:12]}>")
        pos = span.end
    pieces.append(text[pos:])
    return "".join(pieces)
