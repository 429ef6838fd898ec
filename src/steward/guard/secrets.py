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

from .base import Match, PatternDetector, scan_with_detectors
from .normalize import Document
from .types import Category, Finding, ScanContext

__all__ = ["SecretsScanner", "shannon_entropy"]


def shannon_entropy(s: str) -> float:
    """Bits per character of `s`'s own character distribution."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


# (entity, regex, score) — public key formats documented by each provider.
_PROVIDERS: tuple[tuple[str, str, float], ...] = (
    ("AWS_ACCESS_KEY", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b", 0.95),
    ("GITHUB_TOKEN", r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b", 0.98),
    ("GITHUB_TOKEN", r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b", 0.98),
    ("GITLAB_TOKEN", r"\bglpat-[A-Za-z0-9_-]{20,}\b", 0.98),
    ("SLACK_TOKEN", r"\bxox[abposr]-(?:\d+-)+[A-Za-z0-9-]{10,}\b", 0.97),
    ("SLACK_WEBHOOK", r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+", 0.97),
    ("STRIPE_KEY", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b", 0.97),
    ("ANTHROPIC_API_KEY", r"\bsk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_-]{40,}\b", 0.98),
    (
        "OPENAI_API_KEY",
        r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}\b",
        0.98,
    ),
    ("OPENAI_API_KEY", r"\bsk-(?:proj-|svcacct-)[A-Za-z0-9_-]{40,}\b", 0.95),
    ("GOOGLE_API_KEY", r"\bAIza[0-9A-Za-z_-]{35}\b", 0.95),
    ("HUGGINGFACE_TOKEN", r"\bhf_[A-Za-z0-9]{34,}\b", 0.95),
    ("NPM_TOKEN", r"\bnpm_[A-Za-z0-9]{36}\b", 0.95),
    ("PYPI_TOKEN", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}\b", 0.98),
    ("SENDGRID_KEY", r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b", 0.98),
    ("TWILIO_KEY", r"\bSK[0-9a-f]{32}\b", 0.8),
    ("AZURE_STORAGE_KEY", r"AccountKey=[A-Za-z0-9+/]{86}==", 0.95),
)


class ProviderKeyDetector:
    """Keys whose format a provider documents (prefix + alphabet + length)."""

    entity = "API_KEY"

    def __init__(self) -> None:
        self._patterns = [(e, re.compile(p), s) for e, p, s in _PROVIDERS]

    def detect(self, text: str) -> Iterable[Match]:
        for entity, pattern, score in self._patterns:
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
        for m in self._pattern.finditer(text):
            yield Match(m.start(), m.end(), 0.95, "JSON Web Token (header.payload.signature)", self.entity)


_ASSIGN = re.compile(
    r"(?i)(?P<k>[\w.-]*(?:api[_-]?key|apikey|secret|token|passwd|password|pwd|credential|auth|access[_-]?key|"
    r"private[_-]?key|client[_-]?secret|密码|密钥|令牌)[\w.-]*)['\"]?\s*(?:[:=]|=>|：|\s+is\s+)\s*"
    r"(?:bearer\s+)?['\"]?(?P<v>[^\s'\"`,;]{8,})"
)
_BEARER = re.compile(r"(?i)\b(?:authorization:\s*)?bearer\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)")


class ContextualSecretDetector:
    """A value assigned to a secret-like name: high entropy, or a password of any shape."""

    entity = "SECRET"

    def detect(self, text: str) -> Iterable[Match]:
        for m in _ASSIGN.finditer(text):
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
        for m in _BEARER.finditer(text):
            value = m.group("v")
            if shannon_entropy(value) >= 3.5:
                yield Match(m.start("v"), m.end("v"), 0.92, "bearer token", "BEARER_TOKEN")


def default_detectors() -> list[PatternDetector]:
    return [ProviderKeyDetector(), PrivateKeyDetector(), JwtDetector(), ContextualSecretDetector()]


class SecretsScanner:
    """Credentials in prompts, documents or answers."""

    name = "secrets"
    category: Category = "secrets"

    def __init__(self) -> None:
        self.detectors = default_detectors()

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        return scan_with_detectors(doc, self.detectors, category="secrets", scanner=self.name)
