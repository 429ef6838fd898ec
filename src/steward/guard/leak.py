"""System-prompt leakage in answers: the gateway's canary token, or long verbatim overlap.

A canary (a random token the gateway plants in the system prompt) is proof of a leak when it shows up
in an answer. Paraphrased leaks have no canary, so the answer is also compared with the system
prompt by word n-gram overlap: a system prompt quoted back, even in pieces, shares many 5-grams with
it, while an answer that merely follows the instructions shares almost none.
"""

from __future__ import annotations

import re

from .normalize import Document
from .types import Category, Finding, ScanContext, Span

__all__ = ["PromptLeakScanner"]

_TOKEN = re.compile(r"\w+", re.UNICODE)


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _words(text: str) -> list[str]:
    # CJK text has no spaces: treat each ideograph as a word so n-grams still mean something.
    return [
        w
        for t in _TOKEN.findall(text.lower())
        for w in (list(t) if re.search(r"[\u4e00-\u9fff]", t) else [t])
    ]


class PromptLeakScanner:
    """Output scanner; needs `ScanContext.canary` and/or `ScanContext.system_prompt`."""

    name = "prompt_leak"
    category: Category = "prompt_leak"

    def __init__(self, ngram: int = 5) -> None:
        if ngram < 2:
            raise ValueError(f"prompt_leak: ngram must be at least 2, got {ngram}")
        self.ngram = ngram

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        findings: list[Finding] = []
        if ctx.canary:
            for text, origin in [(doc.original, None), *((s.text, s.origin) for s in doc.segments)]:
                i = text.find(ctx.canary)
                if i >= 0:
                    span = origin or Span(i, i + len(ctx.canary))
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
                    break
        if ctx.system_prompt:
            sys_grams = _grams(_words(ctx.system_prompt), self.ngram)
            out_grams = _grams(_words(doc.text), self.ngram)
            if sys_grams and out_grams:
                shared = len(sys_grams & out_grams)
                score = min(1.0, shared / max(1, min(len(sys_grams), 40)))
                if shared:
                    findings.append(
                        Finding(
                            "prompt_leak",
                            "SYSTEM_PROMPT_OVERLAP",
                            score,
                            [Span(0, len(doc.original))],
                            f"{shared} of the system prompt's {len(sys_grams)} word "
                            f"{self.ngram}-grams repeated",
                            scanner=self.name,
                        )
                    )
        return findings
