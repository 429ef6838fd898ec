"""The hand-written evaluation texts of `benchmarks/bench_guards.py` stay out of the training data.

The bench reports "text in no training template" (UNSEEN, UNSEEN_DOCS, UNSEEN_CONTEXT,
UNSEEN_MULTILINGUAL, UNSEEN_EXTRACTION, UNSEEN_PROMPTING, UNSEEN_EVERYDAY, UNSEEN_ATTACKS,
UNSEEN_SHAPES, UNSEEN_RESTRICTED, UNSEEN_BLIND) as the figure that matters most, so a training
text that copies one of them (or nearly: the same question with a word added) makes that figure a
training-set score. One did once ("Как сварить борщ?" was in both); this test keeps it from
happening again.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from steward.guard.benign_everyday import EVERYDAY_REQUESTS
from steward.guard.benign_multilingual import BENIGN_MULTILINGUAL
from steward.guard.benign_multilingual_chat import BENIGN_MULTILINGUAL_CHAT
from steward.guard.benign_shapes import BENIGN_SHAPES
from steward.guard.lookalikes import lookalikes
from steward.guard.multilingual_attacks import ML_ATTACKS, ML_LOOKALIKES
from steward.guard.synth import benign_examples, hate_examples, injection_examples

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_guards.py"
CLASSIFIER_TESTS = Path(__file__).resolve().parent / "test_classifier.py"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench() -> ModuleType:
    return _load("bench_guards", BENCH)


def _trigrams(text: str) -> set[str]:
    t = " ".join(text.lower().split())
    return {t[i : i + 3] for i in range(len(t) - 2)}


def _unseen_texts(bench: ModuleType) -> list[str]:
    out: list[str] = []
    for name in (
        "UNSEEN",
        "UNSEEN_DOCS",
        "UNSEEN_CONTEXT",
        "UNSEEN_MULTILINGUAL",
        "UNSEEN_EXTRACTION",
        "UNSEEN_PROMPTING",
        "UNSEEN_EVERYDAY",
        "UNSEEN_RESTRICTED",
    ):
        for item in getattr(bench, name):
            # (label, text), (language, text) or (label, text, system prompt): every string but the first
            out.extend([item] if isinstance(item, str) else [x for x in item[1:] if isinstance(x, str)])
    out.extend(text for _, _, _, text in bench.UNSEEN_ATTACKS)  # (label, language, kind, text)
    out.extend(text for _, _, _, text in bench.UNSEEN_SHAPES)
    out.extend(text for _, _, _, text in bench.UNSEEN_BLIND)
    # The committed head's own unseen cases (tests/guard/test_classifier.py) are evaluation text too.
    tests = _load("guard_classifier_cases", CLASSIFIER_TESTS)
    out.extend(tests._text(p) for p in [*tests.ATTACKS, *tests.BENIGN])
    return out


def _training_texts() -> list[str]:
    texts = [t for v in BENIGN_MULTILINGUAL.values() for t in v]
    texts += [t for v in BENIGN_MULTILINGUAL_CHAT.values() for t in v]
    texts += EVERYDAY_REQUESTS
    texts += [t for kinds in ML_ATTACKS.values() for v in kinds.values() for t in v]
    texts += [t for v in ML_LOOKALIKES.values() for t in v]
    texts += [t for v in BENIGN_SHAPES.values() for t in v]
    texts += [t for _, t in lookalikes()]
    texts += [t for _, _, t in injection_examples(12, 0)]
    texts += [t for _, t in benign_examples(12, 0)]
    texts += [t for _, t in hate_examples(12, 0)]
    return texts


def test_no_training_text_copies_an_unseen_evaluation_text() -> None:
    unseen = [(u, _trigrams(u)) for u in _unseen_texts(_bench())]
    assert len(unseen) > 60
    close = []
    for text in _training_texts():
        grams = _trigrams(text)
        for u, ug in unseen:
            jaccard = len(grams & ug) / max(1, len(grams | ug))
            if jaccard >= 0.6:
                close.append((round(jaccard, 2), text, u))
    assert not close, close


def test_the_check_sees_a_near_copy() -> None:
    a = _trigrams("Bagaimana cara membuat nasi goreng yang enak?")
    b = _trigrams("Bagaimana cara membuat nasi goreng?")
    assert len(a & b) / len(a | b) >= 0.6


def test_the_blind_set_copies_no_other_evaluation_text() -> None:
    """The reserve blind set must stay blind if the other unseen sets become a choosing split: no
    text of it may nearly copy one of theirs (or a candidate training text, checked above)."""
    bench = _bench()
    blind = [t for _, _, _, t in bench.UNSEEN_BLIND]
    assert len(blind) > 200 and len(set(blind)) == len(blind)
    assert {lang for _, lang, _, _ in bench.UNSEEN_BLIND} >= {"en", "zh", "ar", "hi", "th"}
    own = set(blind)
    others = [(u, _trigrams(u)) for u in _unseen_texts(bench) if u not in own]
    close = []
    for text in blind:
        grams = _trigrams(text)
        for u, ug in others:
            if len(grams & ug) / max(1, len(grams | ug)) >= 0.6:
                close.append((text, u))
    assert not close, close
