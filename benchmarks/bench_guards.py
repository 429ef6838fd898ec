"""Guard quality and speed tables (issue 4, items 9 and 10).

Quality: the classifier head's held-out metrics (models/guard/metrics.json, written by
`steward guard train` on the fixed group-hashed 20% that is never trained or tuned on) and PII F2 on
the synthetic Faker set per language. Speed: p50/p99 per scanner and for the full input pipeline at
about 50, 500 and 2,000 tokens on 2 threads. Presidio and LLM Guard rows appear when those packages
are importable (they belong in their own venvs; see the note printed when they are not).

    .venv/bin/python benchmarks/bench_guards.py [--runs 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def quality() -> None:
    path = ROOT / "models" / "guard" / "metrics.json"
    if not path.is_file():
        print("no models/guard/metrics.json: run `steward guard train` first")
    else:
        held = json.loads(path.read_text())["heldout"]
        print("\n## Classifier head, held-out 20% (group split)\n")
        print("| category | n+ | n- | threshold | precision | recall | F1 | FPR | TPR@1%FPR |")
        print("|---|---|---|---|---|---|---|---|---|")
        for cat, m in held.items():
            print(
                f"| {cat} | {m['n_pos']} | {m['n_neg']} | {m['threshold']:.3f} | {m['precision']:.3f} | "
                f"{m['recall']:.3f} | {m['f1']:.3f} | {m['fpr']:.4f} | {m['tpr_at_1pct_fpr']:.3f} |"
            )
        print("\nFalse-positive rate per benign set (held-out):\n")
        sets = sorted({s for m in held.values() for s in m["fpr_by_benign_set"]})
        print("| category | " + " | ".join(sets) + " |")
        print("|---|" + "---|" * len(sets))
        for cat, m in held.items():
            row = [m["fpr_by_benign_set"].get(s) for s in sets]
            print(
                f"| {cat} | " + " | ".join(f"{r['fpr']:.3f} (n={r['n']})" if r else "-" for r in row) + " |"
            )
        print("\nRecall by language (held-out positives):\n")
        for cat, m in held.items():
            langs = ", ".join(
                f"{k} {v['recall']:.2f} (n={v['n']})" for k, v in m["recall_by_language"].items()
            )
            print(f"- {cat}: {langs}")
        print("\nRecall by source (held-out positives):\n")
        for cat, m in held.items():
            srcs = ", ".join(f"{k} {v['recall']:.2f} (n={v['n']})" for k, v in m["recall_by_source"].items())
            print(f"- {cat}: {srcs}")

    from guard.pii_synth import PiiGenerator, score
    from steward.guard import ScanContext, normalise
    from steward.guard.pii import QUASI_ENTITIES, PIIScanner

    pii = PIIScanner()

    def predict(text: str) -> list[tuple[int, int, str]]:
        fs = pii.scan(normalise(text), ScanContext())
        return [(f.start, f.end, f.entity) for f in fs if f.entity not in QUASI_ENTITIES and f.score >= 0.5]

    print("\n## PII on synthetic Faker text (seed 99, 1,000 texts per language)\n")
    print("| language | precision | recall | F2 |")
    print("|---|---|---|---|")
    for lang in ("en", "zh"):
        r = score(PiiGenerator(seed=99).samples(1000, lang), predict)
        print(f"| {lang} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f2']:.3f} |")


def _texts(tokens: int) -> str:
    base = (
        "Please summarise the attached quarterly report for the board. Contact Jane Miller at "
        "jane.miller@example.com or +1 415 555 0134 if anything is unclear; the figures for the "
        "northern region were revised after the audit and the marketing budget moved to Q3. "
    )
    words = base.split()
    return " ".join(words[i % len(words)] for i in range(int(tokens * 0.75)))


def speed(runs: int) -> None:
    from steward.guard import Pipeline, ScanContext

    pipeline = Pipeline()
    print(f"\n## Speed, {torch.get_num_threads()} threads, {runs} runs each (ms)\n")
    print("| tokens | scanner | p50 | p99 |")
    print("|---|---|---|---|")
    pipeline.scan_text("warm up the encoder", ScanContext())
    for tokens in (50, 500, 2000):
        text = _texts(tokens)
        from steward.guard.classifier import get_guard_model

        n_tok = len(get_guard_model().windows(text))
        per: dict[str, list[float]] = {}
        total: list[float] = []
        for _ in range(runs):
            t = time.perf_counter()
            v = pipeline.scan_text(text, ScanContext())
            total.append((time.perf_counter() - t) * 1000)
            for k, ms in v.latency_ms.items():
                per.setdefault(k, []).append(ms)
        for k, xs in [*per.items(), ("full input pipeline", total)]:
            xs = sorted(xs)
            p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))]
            print(f"| {tokens} ({n_tok} windows) | {k} | {statistics.median(xs):.2f} | {p99:.2f} |")
    for peer in ("presidio_analyzer", "llm_guard"):
        try:
            __import__(peer)
        except ImportError:
            print(
                f"\n{peer}: not installed here; install it in its own venv "
                "(pip -c constraints.txt) to compare."
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quality()
    if not args.skip_speed:
        speed(args.runs)


if __name__ == "__main__":
    main()
