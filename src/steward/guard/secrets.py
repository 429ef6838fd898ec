"""Credential detectors: provider key formats, private keys, JWTs, high-entropy tokens in context.

Provider prefixes (`AKIA`, `ghp_`, `sk-ant-`, ...) are near-certain on their own. A random-looking
string is only a secret when something says so (`api_key=`, `token:`, `password`), because hashes,
UUIDs and base64 images are random-looking too; entropy alone would flood benign code with findings.
Findings never carry the secret: only offsets, the provider and why.
"""

from __future__ import annotations

import base64
import bisect
import math
import re
from collections import Counter
from collections.abc import Iterable

from .base import Match, PatternDetector, ascii_fold, may_contain, scan_with_detectors
from .normalize import Document
from .types import Category, Finding, ScanContext

__all__ = ["SECRET_ENTITIES", "SecretsScanner", "shannon_entropy"]


def shannon_entropy(s: str) -> float:
    """Bits per character of `s`'s own character distribution."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


# (entity, regex, score, literals) — public key formats documented by each provider. `literals`: every
# match contains one of these strings, so a text with none of them skips the regex (a substring test
# is ~100x cheaper than a regex pass, and most texts contain no key at all).
_PROVIDERS: tuple[tuple[str, str, float, tuple[str, ...]], ...] = (
    ("AWS_ACCESS_KEY", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b", 0.95, ("AKIA", "ASIA", "ABIA", "ACCA")),
    (
        "GITHUB_TOKEN",
        r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b",
        0.98,
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    ),
    ("GITHUB_TOKEN", r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b", 0.98, ("github_pat_",)),
    ("GITLAB_TOKEN", r"\bglpat-[A-Za-z0-9_-]{20,}\b", 0.98, ("glpat-",)),
    ("SLACK_TOKEN", r"\bxox[abposre]-(?:\d+-)+[A-Za-z0-9-]{10,}\b", 0.97, ("xox",)),
    ("SLACK_TOKEN", r"\bxapp-\d-[A-Z0-9]{8,}-\d{8,}-[A-Za-z0-9]{32,}\b", 0.97, ("xapp-",)),
    (
        "SLACK_WEBHOOK",
        r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+",
        0.97,
        ("https://hooks.slack.com/services/T",),
    ),
    ("STRIPE_KEY", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b", 0.97, ("_live_", "_test_")),
    ("ANTHROPIC_API_KEY", r"\bsk-ant-[a-z]{2,6}\d{2}-[A-Za-z0-9_-]{40,}", 0.98, ("sk-ant-",)),
    (
        "OPENAI_API_KEY",
        r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}\b",
        0.98,
        ("T3BlbkFJ",),
    ),
    ("OPENAI_API_KEY", r"\bsk-(?:proj-|svcacct-)[A-Za-z0-9_-]{40,}\b", 0.95, ("sk-proj-", "sk-svcacct-")),
    ("GOOGLE_API_KEY", r"\bAIza[0-9A-Za-z_-]{35}\b", 0.95, ("AIza",)),
    ("HUGGINGFACE_TOKEN", r"\bhf_[A-Za-z0-9]{34,}\b", 0.95, ("hf_",)),
    ("NPM_TOKEN", r"\bnpm_[A-Za-z0-9]{36}\b", 0.95, ("npm_",)),
    ("PYPI_TOKEN", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}\b", 0.98, ("pypi-AgEIcHlwaS5vcmc",)),
    ("SENDGRID_KEY", r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b", 0.98, ("SG.",)),
    ("TWILIO_KEY", r"\bSK[0-9a-f]{32}\b", 0.8, ("SK",)),
    ("AZURE_STORAGE_KEY", r"AccountKey=[A-Za-z0-9+/]{86}==", 0.95, ("AccountKey=",)),
)


# (subtype, provider, regex, score, literals): formats with no entity name of their own, reported as
# SECRET with the provider in `subtype` and the reason.
_OTHER_PROVIDERS: tuple[tuple[str, str, str, float, tuple[str, ...]], ...] = (
    ("webhook_secret", "Stripe/Svix webhook secret", r"\bwhsec_[A-Za-z0-9+/]{24,}={0,2}", 0.95, ("whsec_",)),
    (
        "telegram_bot_token",
        "Telegram bot token",
        r"(?<![\d:])\d{8,10}:AA[A-Za-z0-9_-]{33}(?![A-Za-z0-9_-])",
        0.95,
        (":AA",),
    ),
    ("digitalocean_token", "DigitalOcean token", r"\bdo[opr]_v1_[a-f0-9]{64}\b", 0.97, ("_v1_",)),
    ("shopify_token", "Shopify token", r"\bshp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}\b", 0.97, ("shp",)),
    (
        "google_oauth_client_secret",
        "Google OAuth client secret",
        r"\bGOCSPX-[A-Za-z0-9_-]{28}(?![A-Za-z0-9_-])",
        0.97,
        ("GOCSPX-",),
    ),
    ("groq_api_key", "Groq API key", r"\bgsk_[A-Za-z0-9]{52}\b", 0.97, ("gsk_",)),
    ("vault_token", "HashiCorp Vault token", r"\bhvs\.[A-Za-z0-9_-]{90,}", 0.95, ("hvs.",)),
    ("postman_api_key", "Postman API key", r"\bPMAK-[a-f0-9]{24}-[a-f0-9]{34}\b", 0.97, ("PMAK-",)),
)


class ProviderKeyDetector:
    """Keys whose format a provider documents (prefix + alphabet + length)."""

    entity = "API_KEY"

    def __init__(self) -> None:
        self._patterns: list[tuple[str, str | None, re.Pattern[str], float, tuple[str, ...], str]] = [
            (e, None, re.compile(p), s, lits, f"{e.lower().replace('_', ' ')} format")
            for e, p, s, lits in _PROVIDERS
        ]
        self._patterns += [
            ("SECRET", sub, re.compile(p), s, lits, f"{name} format")
            for sub, name, p, s, lits in _OTHER_PROVIDERS
        ]

    def detect(self, text: str) -> Iterable[Match]:
        for entity, subtype, pattern, score, literals, reason in self._patterns:
            if not may_contain(text, literals):
                continue
            for m in pattern.finditer(text):
                yield Match(m.start(), m.end(), score, reason, entity, subtype)


class PrivateKeyDetector:
    entity = "PRIVATE_KEY"
    # A block with its END line (within 20,000 characters: newlines may be real or "\n" escapes in
    # a JSON string); or, without one (a key cut off, or still streaming), the BEGIN line, the
    # RFC 1421 headers of a legacy encrypted key (Proc-Type, DEK-Info) and the key-material runs
    # after them, each at least 16 base64 characters, plus a shorter run at the very end of the
    # text. Not "to the end of the text": a sentence that mentions the BEGIN line would have masked
    # everything after it, and made a stream hold and re-scan it to the end.
    _begin = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
    _end = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
    _window = 20_000
    _truncated = re.compile(
        r"(?:(?:\s|\\[rn])+(?:Proc-Type|DEK-Info):[^\r\n\\]*)*"
        r"(?:(?:\s|\\[rn])+[A-Za-z0-9+/=]{16,})*(?:(?:\s|\\[rn])+[A-Za-z0-9+/=]+\Z)?"
    )

    def detect(self, text: str) -> Iterable[Match]:
        # The END lines are found once, and each BEGIN takes the first one after it by bisection:
        # a lazy `BEGIN[\s\S]{0,20000}?END` looked 20,000 characters ahead from every BEGIN line
        # that has none (quadratic-like on a text of repeated BEGIN lines).
        if "-----BEGIN " not in text:
            return
        ends = [(m.start(), m.end()) for m in self._end.finditer(text)] if "-----END " in text else []
        starts = [s for s, _ in ends]
        done = 0
        for b in self._begin.finditer(text):
            if b.start() < done:
                continue  # inside the block just reported
            i = bisect.bisect_left(starts, b.end())
            if i < len(ends) and ends[i][0] - b.end() <= self._window:
                done = ends[i][1]
            else:
                body = self._truncated.match(text, b.end())
                done = body.end() if body else b.end()
            yield Match(b.start(), done, 0.99, "PEM private key block", self.entity)


class JwtDetector:
    entity = "JWT"
    _pattern = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")

    def detect(self, text: str) -> Iterable[Match]:
        if not may_contain(text, ("eyJ",)):
            return
        for m in self._pattern.finditer(text):
            yield Match(m.start(), m.end(), 0.95, "JSON Web Token (header.payload.signature)", self.entity)


# ---- a value assigned to a secret-like name ----------------------------------------------------------
#
# The regex finds `name <separator> value` where the name holds a secret word anywhere; `_key_kind`
# then reads the name as an identifier (snake_case, camelCase, kebab-case, dotted) and accepts it only
# when its last word is the secret word (`DB_PASSWORD`, `clientSecret`, `x-api-key`, `API_KEY_V2`),
# so `tokenizer`, `author`, `token_url`, `auth_uri`, `secretName`, `password_hash` are not secret names.
# `key` counts only after a qualifier (api, access, private, ...): `cache_key` is not a secret.
_SECRET_WORD = r"secret|token|pass|pwd|credential|auth|key"
_ASSIGN = re.compile(
    rf"(?i)(?<![\w.-])(?P<k>[a-z0-9_.-]*(?:{_SECRET_WORD})[a-z0-9_.-]*)(?P<kq>['\"]?)"
    r"\s*(?P<sep>=>|[:=：]|\s(?:is|was)\s)\s*"
    r"(?:bearer\s+)?(?P<q>['\"]?)(?P<v>[^\s'\"`,;]+)"
)
# Necessary conditions, as substrings of `ascii_fold(text)`: every _ASSIGN match holds one of these
# words, every _BEARER match "bearer", every _BASIC match "basic".
_SECRET_WORDS = ("key", "secret", "token", "pass", "pwd", "credential", "auth")
_BEARER = re.compile(r"(?i)\b(?:authorization:\s*)?bearer\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)")
_BASIC = re.compile(r"(?i)\bbasic\s+(?P<v>[A-Za-z0-9+/]{6,}={0,2})(?![A-Za-z0-9+/=])")

_PASSWORD_WORDS = frozenset({"password", "passwd", "pwd", "pass", "passphrase", "passcode"})
_SECRET_NAME_WORDS = frozenset(
    {"secret", "token", "credential", "credentials", "auth", "authorization", "apikey", "secretkey"}
    | {"accesskey", "privatekey", "authtoken", "accesstoken", "refreshtoken"}
)
_KEY_QUALIFIERS = frozenset(
    {"api", "access", "private", "secret", "signing", "encryption", "encrypt", "master", "client"}
    | {"app", "account", "license", "subscription", "service", "admin", "hmac", "jwt", "session"}
    | {"ssh", "deploy", "storage", "webhook"}
)
# Words that may follow the secret word in a name without changing what it holds (API_KEY_PROD).
_TRAILING = frozenset(
    {"v", "prod", "production", "dev", "development", "staging", "stage", "test", "live", "sandbox"}
    | {"base", "value", "val", "b64", "base64", "raw", "str", "plain", "plaintext", "confirm"}
    | {"confirmation", "new", "old", "current", "hex", "default", "local", "remote"}
)
_NAME_PARTS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def _key_kind(key: str) -> str | None:
    """'password', 'secret' or None: what the value of a variable or field called `key` holds."""
    parts = [p.lower() for p in _NAME_PARTS.findall(key)]
    while parts and (parts[-1] in _TRAILING or parts[-1].isdigit()):
        parts.pop()
    if not parts:
        return None
    last = parts[-1]
    if last in _PASSWORD_WORDS or last.endswith(("password", "passwd")):
        return "password"
    if last in _SECRET_NAME_WORDS or last.endswith(("token", "secret", "apikey", "secretkey")):
        return "secret"
    if last == "key" and len(parts) > 1 and parts[-2] in _KEY_QUALIFIERS:
        return "secret"
    return None


# Values that are not the secret: placeholders, types, and the ordinary words that follow
# "password is" in prose ("my password is incorrect", "password is required").
_NOT_VALUES = frozenset(
    {"none", "null", "nil", "true", "false", "undefined", "empty", "changeme", "example", "sample"}
    | {"placeholder", "dummy", "redacted", "hidden", "masked", "string", "str", "text", "required"}
    | {"optional", "incorrect", "invalid", "wrong", "expired", "reset", "changed", "missing", "correct"}
    | {"password", "passwd", "pass", "pwd", "yourpassword", "your_password", "mypassword"}
    | {"notset", "unset", "tbd", "todo"}
)
# A lookup, not a literal (only for unquoted values): a call or subscript (`os.getenv(`,
# `request.form[`), an attribute path (`settings.DB_PASSWORD`), a snake_case, SCREAMING_CASE or
# camelCase identifier (`password_input`, `DB_PASSWORD`, `passwordInput`).
_LOOKUP = re.compile(
    r"[A-Za-z_][\w.]*[(\[].*|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[a-z][a-z0-9]*(?:_[a-z0-9]+)+"
    r"|[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[a-z]+(?:[A-Z][a-z]+)+"
)
_WORDISH = re.compile(r"[A-Za-z]*\d+(?:[A-Za-z]|\d)?")
_VOWEL = re.compile(r"[aeiouyAEIOUY]")


def _unwrap(value: str) -> str:
    """`value` less closing brackets it does not open: `f(password=pw)` ends the value at `pw`."""
    while (
        value
        and value[-1] in ")]}"
        and value.count(value[-1]) > value.count({")": "(", "]": "[", "}": "{"}[value[-1]])
    ):
        value = value[:-1]
    return value


def _placeholder(value: str, key: str) -> bool:
    low = value.lower()
    if low in _NOT_VALUES or low in {p.lower() for p in _NAME_PARTS.findall(key)}:
        return True
    if value.startswith(("$", "{", "<", "%", "env(", "os.environ", "process.env")):
        return True
    return set(value) <= set("*x•.-_#?X") or len(set(value)) == 1


def _name_like(value: str) -> bool:
    """A resource name or path made of words (`prod-db-credentials-v2`, `meta-llama/Llama-3.1-8B`):
    every part a word or a short version-like token, and at least one real word."""
    parts = [p for p in re.split(r"[-_./:@]+", value) if p]
    if len(parts) < 2:
        return False
    words = [p for p in parts if p.isalpha() and (p.islower() or p.isupper() or p.istitle())]
    if not any(len(w) >= 4 and _VOWEL.search(w) for w in words):
        return False
    return all(p in words or len(p) <= 2 or _WORDISH.fullmatch(p) for p in parts)


def _password_ok(value: str, *, literal: bool, quoted: bool) -> bool:
    """Whether `value`, after a password name, is a password. Unquoted letters-only values count only
    in `NAME=value` form (env files, shell): in prose they are words ("incorrect"), in code names."""
    if len(value) < (4 if quoted else 6):
        return False
    if value.isalpha():
        if not literal or not value.isascii():
            return False
        if quoted and value[0].isupper() and value[1:].islower():
            return False  # a label in a translation file: "password": "Passwort"
    return True


def _high_entropy(value: str) -> bool:
    return (
        len(value) >= 16
        and shannon_entropy(value) >= 3.5
        and re.search(r"\d", value) is not None
        and re.search(r"[A-Za-z]", value) is not None
    )


# Chinese disclosures: 密码/口令 (password), 密钥/秘钥/令牌 (key, token), then 是/为/a colon/a space or
# nothing, then an ASCII value (`我的密码是Abc123456`, `密码 abc12345678`, `口令：Abc123456!`).
_ZH_WORDS = ("密码", "口令", "密钥", "秘钥", "令牌")
_ZH_ASSIGN = re.compile(
    r"(?P<k>密码|口令|密钥|秘钥|令牌)(?:\s*(?:是|为|[:=：]))*\s*(?P<q>['\"]?)"
    r"(?P<v>[A-Za-z0-9!#$%&()*+\-./:<=>?@\[\]^_{|}~\\]+)"
)

# Passwords on a command line: (literal that every match holds, the command, its password flag). The
# flag counts anywhere after the command on the same logical line (a backslash-newline continues
# it). Each line is read once, from its first command: a pattern `command[^\n]*?flag` read the rest
# of the line again from every occurrence of the command, quadratic on "curl -u curl -u ...".
_CLI: tuple[tuple[str, re.Pattern[str], re.Pattern[str]], ...] = (
    (
        "curl",
        re.compile(r"\bcurl\b"),
        re.compile(r"\s(?:-u|--user)(?:\s+|=)['\"]?[^\s:'\"]+:(?P<v>[^\s'\"]+)"),
    ),
    ("mysql", re.compile(r"\bmysql(?:dump|admin)?\b"), re.compile(r"\s-p['\"]?(?P<v>[^\s'\"]+)")),
    ("mariadb", re.compile(r"\bmariadb(?:-dump)?\b"), re.compile(r"\s-p['\"]?(?P<v>[^\s'\"]+)")),
    ("sshpass", re.compile(r"\bsshpass\b"), re.compile(r"\s-p\s*['\"]?(?P<v>[^\s'\"]+)")),
    (
        "login",
        re.compile(r"\b(?:docker|podman|buildah|helm\s+registry)\s+login\b"),
        re.compile(r"\s-p\s+['\"]?(?P<v>[^\s'\"]+)"),
    ),
)
_PASSWORD_FLAG = re.compile(r"(?<![\w-])--password\s+['\"]?(?P<v>[^\s'\"-][^\s'\"]*)")
_LINE_END = re.compile(r"(?<!\\)\n")


def _cli_passwords(text: str) -> Iterable[re.Match[str]]:
    """Every password-flag match (group `v`) after a command on its line, in linear time."""
    for literal, command, flag in _CLI:
        if literal not in text:
            continue
        line_end = -1
        for c in command.finditer(text):
            if c.start() < line_end:
                continue  # its line was read from an earlier command: every flag after this one too
            end = _LINE_END.search(text, c.end())
            line_end = end.start() if end else len(text)
            yield from flag.finditer(text, c.end(), line_end)
    if "--password" in text:
        yield from _PASSWORD_FLAG.finditer(text)


# A URL with a password and no user name (`redis://:pw@host`); pii's URL_CREDENTIALS needs a user.
_URL_NO_USER = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://:(?P<v>[^\s/@'\"]+)@")


def _basic_credentials(value: str) -> bool:
    """Whether `value` is base64 of `user:password` with a non-empty password."""
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return False
    _user, sep, pw = raw.partition(":")
    return bool(sep and pw) and raw.isprintable()


class ContextualSecretDetector:
    """A value assigned to a secret-like name (high entropy, or a password of any shape), a password
    on a command line, in a URL without a user, or in HTTP Basic credentials."""

    entity = "SECRET"

    def detect(self, text: str) -> Iterable[Match]:
        folded = ascii_fold(text)
        if may_contain(text, _SECRET_WORDS, folded):
            yield from self._assignments(text)
        if not text.isascii() and may_contain(text, _ZH_WORDS):
            yield from self._chinese(text)
        # every _CLI match holds "-u" (curl -u, --user) or "-p" (-p, --password)
        for m in _cli_passwords(text) if "-p" in text or "-u" in text else ():
            v = m.group("v")
            if len(v) >= 3 and not _placeholder(v, "password"):
                yield Match(m.start("v"), m.end("v"), 0.85, "password on a command line", "PASSWORD")
        if "://:" in text:
            for m in _URL_NO_USER.finditer(text):
                if not _placeholder(m.group("v"), "password"):
                    yield Match(m.start("v"), m.end("v"), 0.9, "password in a URL", "PASSWORD")
        for m in _BEARER.finditer(text) if may_contain(text, ("bearer",), folded) else ():
            value = m.group("v")
            if shannon_entropy(value) >= 3.5:
                yield Match(m.start("v"), m.end("v"), 0.92, "bearer token", "BEARER_TOKEN")
        for m in _BASIC.finditer(text) if may_contain(text, ("basic",), folded) else ():
            if _basic_credentials(m.group("v")):
                yield Match(
                    m.start("v"), m.end("v"), 0.9, "HTTP Basic credentials (user:password)", "PASSWORD"
                )

    def _assignments(self, text: str) -> Iterable[Match]:
        for m in _ASSIGN.finditer(text):
            key, value = m.group("k"), m.group("v")
            kind = _key_kind(key)
            if kind is None:
                continue
            q, end = m.group("q"), m.end("v")
            quoted = bool(q) and text[end : end + 1] == q
            if not quoted:
                value = _unwrap(value)
                end = m.start("v") + len(value)
            literal = quoted or text[m.end("kq") : m.start("q")] == "="  # NAME=value, no spaces
            quoted_key = bool(m.group("kq")) and m.start("k") > 0 and text[m.start("k") - 1] == m.group("kq")
            if key.lower() == "pass" and not (quoted_key or m.group("sep") in ("=", "=>")):
                continue  # "boarding pass: ...", "Pass: 120" (test results)
            if _placeholder(value, key) or (not quoted and _LOOKUP.fullmatch(value)) or "://" in value:
                continue  # credentials inside URLs: pii's URL_CREDENTIALS
            if kind == "password":
                if _password_ok(value, literal=literal, quoted=quoted):
                    yield Match(m.start("v"), end, 0.85, f"password assigned to '{key}'", "PASSWORD")
            elif _name_like(value):
                continue
            elif _high_entropy(value):
                entropy = shannon_entropy(value)
                yield Match(
                    m.start("v"),
                    end,
                    0.9,
                    f"high-entropy value ({entropy:.1f} bits/char) assigned to '{key}'",
                    self.entity,
                )
            elif literal and len(value) >= 8 and _NAME_PARTS.findall(key)[-1].lower().endswith("secret"):
                yield Match(m.start("v"), end, 0.85, f"value assigned to '{key}'", self.entity)

    def _chinese(self, text: str) -> Iterable[Match]:
        for m in _ZH_ASSIGN.finditer(text):
            key, value = m.group("k"), m.group("v")
            q, end = m.group("q"), m.end("v")
            quoted = bool(q) and text[end : end + 1] == q
            if not quoted:
                value = _unwrap(value)
                end = m.start("v") + len(value)
            if _placeholder(value, "password") or (not quoted and _LOOKUP.fullmatch(value)):
                continue
            if key in ("密码", "口令"):
                if _password_ok(value, literal=quoted, quoted=quoted):
                    yield Match(m.start("v"), end, 0.85, f"password after '{key}'", "PASSWORD")
            elif _high_entropy(value) and not _name_like(value):
                yield Match(m.start("v"), end, 0.9, f"high-entropy value after '{key}'", self.entity)


def default_detectors() -> list[PatternDetector]:
    return [ProviderKeyDetector(), PrivateKeyDetector(), JwtDetector(), ContextualSecretDetector()]


# Every entity name the detectors above report: what a policy's `entity_actions` may name.
# tests/guard/test_detectors.py checks it against what they emit on varied text, both ways.
SECRET_ENTITIES = frozenset(
    [e for e, _, _, _ in _PROVIDERS] + ["PRIVATE_KEY", "JWT", "SECRET", "PASSWORD", "BEARER_TOKEN"]
)


class SecretsScanner:
    """Credentials in prompts, documents or answers."""

    name = "secrets"
    category: Category = "secrets"
    entities: frozenset[str] = SECRET_ENTITIES

    def __init__(self) -> None:
        self.detectors = default_detectors()

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        return scan_with_detectors(doc, self.detectors, category="secrets", scanner=self.name)
