"""Steward's guards: PII, secrets, prompt injection, jailbreak, harmful content, toxicity, leakage.

The gateway uses `Pipeline` (policy engine) and the `Verdict` it returns; everything else is
reachable for tests, the CLI (`steward scan`, `steward guard train`) and the benchmark.
Classifier scanners import torch and load the encoder lazily, on their first scan.
"""

from __future__ import annotations

from .base import Match, Registry, Scanner, default_registry
from .normalize import Document, normalise
from .pipeline import Pipeline, StreamChunk, StreamGuard
from .policy import Policy, PolicyError, PolicySet, ScannerSpec, load_policy_set
from .redact import Vault, redact
from .types import CATEGORIES, Action, Finding, ScanContext, ScannerError, Span, Verdict

__all__ = [
    "CATEGORIES",
    "Action",
    "Document",
    "Finding",
    "Match",
    "Pipeline",
    "Policy",
    "PolicyError",
    "PolicySet",
    "Registry",
    "ScanContext",
    "Scanner",
    "ScannerError",
    "ScannerSpec",
    "Span",
    "StreamChunk",
    "StreamGuard",
    "Vault",
    "Verdict",
    "default_registry",
    "load_policy_set",
    "normalise",
    "redact",
]
