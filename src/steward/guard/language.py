"""Which texts the English classifier can read, and which go to the multilingual one as well.

The guard's main encoder (all-MiniLM-L6-v2) has an English WordPiece vocabulary: Hindi, Bengali,
Thai and most CJK text reach it as [UNK] runs, and Latin-script languages as fragments. Texts that
are not English are therefore *also* scored by the multilingual encoder (multilingual-e5-small, see
`steward.model.e5`). English traffic — most of it — never pays for the second, twice-as-deep
encoder.

The router is py3langid (a maintained fork of langid.py: a naive Bayes over byte n-grams, 97
languages, its model inside the wheel, ~0.05 ms a short text). It is used as a router, not as a
label: a text is "English" only when py3langid's top language is English. On the training data it
sends 2 of 815 non-English CyberSecEval attacks to English and ~8% of English tweets (slang) to the
multilingual path as well, which costs time there, not quality: the English classifier still scores
them.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["ROUTER", "is_english", "language_of"]

ROUTER = "py3langid"
_SAMPLE_CHARS = 2000  # the identifier's cost grows with length; 2,000 characters decide any language


@functools.cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str) -> str:
    """ISO 639-1 code of the most likely language ("en" for empty or letterless text)."""
    sample = text[:_SAMPLE_CHARS]
    if not any(ch.isalpha() for ch in sample):
        return "en"
    lang, _ = _identifier().classify(sample)
    return str(lang)


def is_english(text: str) -> bool:
    """Whether the English classifier alone reads `text` (see the module docstring)."""
    return language_of(text) == "en"
