"""Credential detectors: provider key formats, private keys, JWTs, high-entropy tokens in context.

Provider prefixes (`AKIA`, `ghp_`, `sk-ant-`, ...) are near-certain on their own. A random-looking
string is only a secret when something says so (`api_key=`, `token:`, `password`), because hashes,
UUIDs and base64 images are random-looking too; entropy alone would flood benign code with findings.
Findings never carry the secret: only offsets, the provider and why.
"""

from __future__ import annotations

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
    ("SLACK_TOKEN", r"\bxox[abposr]-(?:\d+-)+[A-Za-z0-9-]{10,}\b", 0.97, ("xox",)),
    (
        "SLACK_WEBHOOK",
        r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+",
        0.97,
        ("https://hooks.slack.com/services/T",),
    ),
    ("STRIPE_KEY", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b", 0.97, ("_live_", "_test_")),
    ("ANTHROPIC_API_KEY", r"\bsk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_-]{40,}\b", 0.98, ("sk-ant-",)),
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


class ProviderKeyDetector:
    """Keys whose format a provider documents (prefix + alphabet + length)."""

    entity = "API_KEY"

    def __init__(self) -> None:
        self._patterns = [(e, re.compile(p), s, lits) for e, p, s, lits in _PROVIDERS]

    def detect(self, text: str) -> Iterable[Match]:
        for entity, pattern, score, literals in self._patterns:
            if not may_contain(text, literals):
                continue
            for m in pattern.finditer(text):
                yield Match(m.start(), m.end(), score, f"{entity.lower().replace('_', ' ')} format", entity)


class PrivateKeyDetector:
    entity = "PRIVATE_KEY"
    _pattern = re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|$)"
    )

    def detect(self, text: str) -> Iterable[Match]:
        for m in self._pattern.finditer(text):
            yield Match(m.start(), m.end(), 0.99, "PEM private key block", self.entity)


class JwtDetector:
    entity = "JWT"
    _pattern = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")

    def detect(self, text: str) -> Iterable[Match]:
        if not may_contain(text, ("eyJ",)):
            return
        for m in self._pattern.finditer(text):
            yield Match(m.start(), m.end(), 0.95, "JSON Web Token (header.payload.signature)", self.entity)


_SECRET_WORD = (
    r"api[_-]?key|apikey|secret|token|passwd|password|pwd|credential|auth|access[_-]?key|"
    r"private[_-]?key|client[_-]?secret|密码|密钥|令牌"
)
# The name starts where a run of name characters starts: `(?<![\w.-])` changes no match (a match
# starting inside a run would also match from the run's start, which the scan reaches first, and a
# previous match always ends before a quote, a comma or a space), but it spares the regex a
# backtracking attempt at every character of every word.
_ASSIGN = re.compile(
    rf"(?i)(?<![\w.-])(?P<k>[\w.-]*(?:{_SECRET_WORD})[\w.-]*)['\"]?\s*(?:[:=]|=>|：|\s+is\s+)\s*"
    r"(?:bearer\s+)?['\"]?(?P<v>[^\s'\"`,;]{8,})"
)
# Necessary conditions, as substrings of `ascii_fold(text)`: every _ASSIGN match holds one of these
# words (api_key, access-key, private_key all end in "key"), every _BEARER match "bearer".
_SECRET_WORDS = ("key", "secret", "token", "passw", "pwd", "credential", "auth", "密码", "密钥", "令牌")
_BEARER = re.compile(r"(?i)\b(?:authorization:\s*)?bearer\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)")


class ContextualSecretDetector:
    """A value assigned to a secret-like name: high entropy, or a password of any shape."""

    entity = "SECRET"

    def detect(self, text: str) -> Iterable[Match]:
        folded = ascii_fold(text)
        for m in _ASSIGN.finditer(text) if may_contain(text, _SECRET_WORDS, folded) else ():
            key, value = m.group("k").lower(), m.group("v")
            if value.lower() in {
                "none",
                "null",
                "true",
                "false",
                "changeme",
                "example",
                "xxxxxxxx",
                "********",
            }:
                continue
            if value.startswith(("$", "{", "<", "os.environ", "process.env", "env(")):
                continue  # a placeholder or a lookup, not the secret itself
            entropy = shannon_entropy(value)
            is_password = any(w in key for w in ("pass", "pwd", "密码"))
            if is_password and len(value) >= 8:
                yield Match(
                    m.start("v"), m.end("v"), 0.85, f"password assigned to '{m.group('k')}'", "PASSWORD"
                )
            elif (
                len(value) >= 16
                and entropy >= 3.5
                and re.search(r"\d", value)
                and re.search(r"[A-Za-z]", value)
            ):
                yield Match(
                    m.start("v"),
                    m.end("v"),
                    0.9,
                    f"high-entropy value ({entropy:.1f} bits/char) assigned to '{m.group('k')}'",
                    self.entity,
                )
        for m in _BEARER.finditer(text) if may_contain(text, ("bearer",), folded) else ():
            value = m.group("v")
            if shannon_entropy(value) >= 3.5:
                yield Match(m.start("v"), m.end("v"), 0.92, "bearer token", "BEARER_TOKEN")


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
