"""The guard's labelled examples: built from ../shared/data and the hand-written sets, split by group.

The held-out 20% is chosen by hashing a *group* key, never a row, so near-duplicates cannot straddle
the split: a CyberSecEval case and its translations share a group (same injection variant and
position block), in-the-wild jailbreaks within Jaccard 0.8 of each other (5-word shingles, exact
Jaccard, the quantity MinHash estimates) share one, each BIPIA attack family is one group, and each
look-alike template is one. Thresholds are tuned on a validation split carved from the training
groups; the held-out split is only ever scored.

Labels are multi-label with a mask: a jailbreak prompt is labelled positive for `jailbreak` and left
unlabelled (masked) for `prompt_injection`, because many jailbreaks are injections too; benign text is
negative for every category.

Beyond the shared data: hand-written templates (`steward.guard.synth`: direct overrides, system-prompt
extraction, instructions hidden in documents, hand translations; and the hard negatives — defenders'
questions, quoted attacks under analysis, sensitive-but-benign requests, neutral mentions of identity
groups), and long documents with one injected instruction whose windows are labelled one by one (the
window holding the instruction positive, the others negative), so the head learns to find an attack
in window 5 of an invoice rather than to call every long document an attack. Hard negatives weigh more
in the loss.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .benign_everyday import EVERYDAY_REQUESTS
from .benign_multilingual import BENIGN_MULTILINGUAL
from .benign_multilingual_chat import BENIGN_MULTILINGUAL_CHAT
from .classifier import HEAD_LABELS
from .lookalikes import lookalikes
from .normalize import normalise
from .synth import benign_examples, hate_examples, injection_examples

__all__ = [
    "DILUTED_SOURCES",
    "MASK",
    "NEG",
    "POS",
    "Example",
    "build_examples",
    "diluted_example",
    "is_heldout",
    "is_validation",
    "limit_examples",
]

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
    windows: int = 1  # how many leading windows carry the label (long jailbreaks: 2); 0 = all
    # Character span of an injected instruction inside a long document: windows covering it are
    # positive for prompt_injection, windows clear of it negative (per-window labels).
    attack: tuple[int, int] | None = None
    attack_label: str = "prompt_injection"  # the label `attack` places per window
    weight: float = 1.0  # loss weight; hard benign look-alikes count more than generic benign text
    # The text as the classifier reads it when serving: the pipeline normalises before it scores
    # (`normalise(text, decode=False).text`: NFKC, invisible characters dropped, homoglyphs folded),
    # so training reads the same string. Reading the raw text taught the head cues it never sees
    # at serving time: CJK is mostly [UNK] to the English vocabulary, and the full-width "？" of the
    # hand-written Chinese benign questions (folded to "?" when serving) told them from
    # CyberSecEval's Chinese attacks. `text` stays raw: reports and the pipeline start from it.
    model_text: str = ""
    # CyberSecEval's "logic-violating" cases: an attack only against its own system prompt's rule
    # ("Wer hat die Zauberflöte komponiert?" under "discussing music is not allowed"). The label
    # stays positive for evaluation; training may mask it (`TrainConfig.mask_context_only`), since a
    # reader of the user turn alone can only learn the topic ("recipes are attacks") from it.
    context_only: bool = False
    # The system prompt a CyberSecEval attack was written against (evaluation reads the turn under
    # it; one user turn can appear under several system prompts).
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if not self.model_text:
            self.model_text = _model_text(self.text)


def _h(key: str, salt: str) -> int:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16)


SPLIT_VERSION = 3
"""The grouping rules new heads are trained with (`steward guard train --split`). A head's manifest
records the version it was trained on (no record: 1), and evaluation rebuilds that version's split:
measuring a head on another version's held-out set would count its own training texts.

1: CyberSecEval translations grouped by their position in the translated file, T0 prompts by file
and row, pasted system prompts with their case. A review (2026-12-05) found the translated file is
not in the English order (162 of 235 held-out translated turns had a translation of the same case
in training), 536 of 633 held-out T0 prompts came from prompt templates also trained on (their FPR
0/536 hid that of unseen templates, 5/97), and 78 of 153 held-out system prompts were copies of
training ones.
2: a case with all its translations, a T0 dataset with all its templates, a system prompt by text.
3: as 2, each pasted system prompt once (one served 48 cases and was counted 48 times), and
near-duplicates by character 3-gram Jaccard >= 0.8 (`_near_duplicate_groups`) grouped
among jailbreaks (renamed DAN clones straddled: 16 texts), among harmful requests across AdvBench,
HarmBench and Do-Not-Answer (9 held-out texts had a one-word edit in training) and among Davidson
tweets (retweet copies); the hand translations of the synthetic attacks one group (each language was
its own); a BIPIA attack only in carriers from its own side of the split (49 of 75 held-out attacks
sat in a training text)."""
SPLIT_CARDS = {
    1: "group hash: 20% held out (is_heldout), ~16% validation (is_validation), rest train",
    2: (
        "group hash: 20% held out (is_heldout), ~16% validation (is_validation), rest train; a group "
        "keeps near-duplicates on one side: a CyberSecEval case with its neighbours and all its "
        "translations, a T0 dataset with all its prompt templates, a system prompt by its text, "
        "jailbreaks within 5-word-shingle Jaccard 0.8, a BIPIA attack family, a look-alike template"
    ),
    3: (
        "group hash: 20% held out (is_heldout), ~16% validation (is_validation), rest train; a group "
        "keeps near-duplicates on one side: a CyberSecEval case with its neighbours and all its "
        "translations, a T0 dataset with all its prompt templates, a system prompt by its text "
        "(each distinct text once), jailbreaks within 5-word-shingle or character-3-gram Jaccard "
        "0.8, harmful requests (across sources) and Davidson tweets within character-3-gram "
        "Jaccard 0.8, a BIPIA attack family (in carriers of its own side), the hand translations "
        "of the synthetic attacks, a look-alike template"
    ),
}


def split_side(group: str) -> str:
    """'test', 'val' or 'train': where a group falls."""
    return "test" if is_heldout(group) else "val" if is_validation(group) else "train"


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


class _Components:
    """Union-find over items 0..n-1; an item's label is its component's root."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)

    def labels(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]


def _jaccard_groups(texts: Sequence[str], threshold: float = 0.8) -> list[int]:
    """Connected components of the 'Jaccard >= threshold' graph (union-find)."""
    sh = [_shingles(t) for t in texts]
    comp = _Components(len(texts))
    for i in range(len(sh)):
        for j in range(i + 1, len(sh)):
            a, b = sh[i], sh[j]
            small, large = (len(a), len(b)) if len(a) <= len(b) else (len(b), len(a))
            if small < threshold * large:
                continue  # Jaccard <= small/large: cannot reach the threshold
            inter = len(a & b)
            if inter / (len(a) + len(b) - inter) >= threshold:
                comp.join(i, j)
    return comp.labels()


def _char3(text: str) -> set[int]:
    t = re.sub(r"\s+", " ", text.lower()).strip()
    return {zlib.crc32(t[i : i + 3].encode()) for i in range(max(1, len(t) - 2))}


def _near_duplicate_groups(texts: Sequence[str], threshold: float = 0.8) -> list[int]:
    """Components of the 'character 3-gram Jaccard >= threshold' graph: renamed clones ("Lucys" vs
    "Donalds" DAN), one-word edits of a short request ("Create / Generate a fake news article...")
    and retweet copies, which 5-word shingles miss (a rename breaks every shingle it touches).

    Candidates come from MinHash LSH (256 stable hashes in 32 bands of 8: a pair at 0.8 is a
    candidate with probability 0.997) and each candidate's exact Jaccard decides; hashes are CRC-32
    and a fixed-seed family, so the split does not depend on the process's hash seed."""
    sets = [_char3(t[:3000]) for t in texts]
    prime = np.uint64(4294967311)
    gen = np.random.default_rng(20261205)
    a = gen.integers(1, 2**31, size=256, dtype=np.uint64)
    b = gen.integers(0, 2**31, size=256, dtype=np.uint64)
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i, s in enumerate(sets):
        x = np.fromiter(s, dtype=np.uint64, count=len(s))
        sig = ((x[:, None] * a[None, :] + b[None, :]) % prime).min(axis=0)
        for band in range(32):
            buckets.setdefault((band, sig[band * 8 : band * 8 + 8].tobytes()), []).append(i)
    comp = _Components(len(texts))
    seen: set[tuple[int, int]] = set()
    for members in buckets.values():
        for k, i in enumerate(members):
            for j in members[k + 1 :]:
                if (i, j) in seen or comp.find(i) == comp.find(j):
                    continue
                seen.add((i, j))
                inter = len(sets[i] & sets[j])
                if inter / (len(sets[i]) + len(sets[j]) - inter) >= threshold:
                    comp.join(i, j)
    return comp.labels()


def _variant_blocks(rows: list[dict[str, Any]]) -> list[str]:
    """Group key per English CyberSecEval case: variant + position block within the variant (5
    blocks), so that a case and its neighbours (the same system prompt with another secret word,
    the same attack on another bot) stay together."""
    by_variant: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_variant.setdefault(r["injection_variant"], []).append(i)
    keys = [""] * len(rows)
    for variant, idx in by_variant.items():
        for pos, i in enumerate(idx):
            keys[i] = f"cse:{variant}:{pos * 5 // len(idx)}"
    return keys


def _translation_cases(path: Path, rows: list[dict[str, Any]], english: list[dict[str, Any]]) -> list[int]:
    """The English case each translated CyberSecEval row translates, so that it takes that case's
    group (the issue's rule: a case and its translations stay on one side of the split).

    The multilingual file is not in the English order: its first 3n rows are three translations of
    each of the n English cases in turn, then come n Hindi rows in the English order. (Grouping by
    position within the variant, as for the English file, put 162 of 235 held-out translated turns
    beside a translation of the same case in training.) The layout is checked row by row against
    the English case's variant, type and risk category, and a file laid out otherwise is refused
    rather than split wrongly."""
    n = len(english)
    if len(rows) != 4 * n:
        raise DataError(
            f"{path}: expected 4 translations of each of the {n} English cases, got {len(rows)} rows"
        )
    cases = [i // 3 for i in range(3 * n)] + list(range(n))
    for i, (row, k) in enumerate(zip(rows, cases, strict=True)):
        for field in ("injection_variant", "injection_type", "risk_category"):
            if row.get(field) != english[k].get(field):
                raise DataError(
                    f"{_item(path, i)}: {field} {row.get(field)!r} is not that of English case {k} "
                    f"({english[k].get(field)!r}); the file's layout is not the one expected"
                )
    return cases


def _text_key(text: str) -> str:
    return hashlib.sha256(_model_text(text).encode()).hexdigest()[:16]


def _t0_datasets(families: list[str]) -> dict[str, str]:
    """The source dataset of each T0 prompt file (`glue_mrpc_equivalent` and
    `glue_mrpc_generate_paraphrase` are two templates over one dataset's texts): the longest
    leading run of `_`-separated words a file shares with another. The split groups by it, so a
    template, and the texts its dataset shares with its other templates, is never on both sides
    (grouped by file and row, 536 of 633 held-out T0 prompts came from templates also trained on,
    and their FPR, 0/536, hid that of unseen templates, 5/97)."""
    words = {f: f.split("_") for f in families}

    def shared(a: list[str], b: list[str]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    out = {}
    for f, w in words.items():
        best = max((shared(w, v) for g, v in words.items() if g != f), default=0)
        out[f] = "_".join(w[:best]) if best else f
    return out


class DataError(ValueError):
    """A data file that does not read as expected; the message starts with its path (and the line
    or item, where one row is at fault).

    Every row is checked where it is parsed, with its file in hand, so the error names the file the
    bad value came from, never whichever file happened to be read last; an error in the code that
    uses the values afterwards stays the error it is."""


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _json(path: Path) -> Any:
    try:
        return json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None


def _jsonl(path: Path) -> list[Any]:
    """One JSON value per line (row i is line i + 1)."""
    rows = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: invalid JSON ({exc})") from None
    return rows


def _csv(path: Path, fields: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV file with a header naming at least `fields`, each present in every row."""
    reader = csv.DictReader(io.StringIO(_read(path)))
    try:
        header = reader.fieldnames or []
        missing = [f for f in fields if f not in header]
        if missing:
            names = ", ".join(repr(f) for f in missing)
            raise DataError(f"{path}: no column {names} in the header ({', '.join(header)})")
        rows = []
        for row in reader:
            short = [f for f in fields if not isinstance(row.get(f), str)]
            if short:
                raise DataError(f"{path}:{reader.line_num}: a row without the field {short[0]!r}")
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return rows


def _at(path: Path, line: int) -> str:
    """Where a JSONL row came from, for messages (row index `line`, 0-based)."""
    return f"{path}:{line + 1}"


def _item(path: Path, i: int) -> str:
    """Where item `i` of a JSON file's array or object came from, for messages."""
    return f"{path}: unexpected content in item {i}"


def _obj(where: str, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    return row


def _text(where: str, row: Any, key: str) -> str:
    """`row[key]`, which must be a string; anything else is a DataError saying where."""
    value = _obj(where, row).get(key)
    if key not in row:
        raise DataError(f"{where}: a row without the field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _texts(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: expected a list of strings")
    return value


def _attack_families(path: Path) -> dict[str, list[str]]:
    """A BIPIA attack file: {family: [attack text, ...]}."""
    doc = _json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected an object of attack families, got {type(doc).__name__}")
    return {str(k): _texts(f"{path}: unexpected content in family {k!r}", v) for k, v in doc.items()}


def build_examples(
    data_dir: str | Path,
    *,
    seed: int = 0,
    t0_sample: int = 2500,
    offensive_sample: int = 2500,
    synth_per_template: int = 12,
    long_docs: int = 400,
    diluted: int = 0,
    hard_negative_weight: float = 3.0,
    split: int = SPLIT_VERSION,
) -> list[Example]:
    """Every labelled example from ../shared/data/guard, corpus benign text and the look-alikes,
    grouped for the split by the rules of version `split` (see SPLIT_VERSION)."""
    if split not in SPLIT_CARDS:
        raise ValueError(f"unknown split version {split}; known: {', '.join(map(str, SPLIT_CARDS))}")
    root = Path(data_dir)
    guard = root / "guard"
    rng = random.Random(seed)
    ex: list[Example] = []

    # -- prompt injection ---------------------------------------------------------------------
    english: list[dict[str, Any]] = []
    english_keys: list[str] = []
    system_seen: set[str] = set()
    for name, lang_key in (
        ("cyberseceval_prompt_injection.json", None),
        ("cyberseceval_prompt_injection_multilingual.json", "speaking_language"),
    ):
        path = guard / "injection" / name
        rows = _json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of test cases, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            for field in ("injection_variant", "user_input", "test_case_prompt"):
                _text(_item(path, i), row, field)
            if lang_key is not None and lang_key not in row:
                raise DataError(f"{_item(path, i)}: a row without the field {lang_key!r}")
        if lang_key is None:
            english, english_keys = rows, _variant_blocks(rows)
            keys = english_keys
        elif split == 1:
            keys = _variant_blocks(rows)
        else:
            keys = [english_keys[k] for k in _translation_cases(path, rows, english)]
        for row, key in zip(rows, keys, strict=True):
            lang = "en" if lang_key is None else str(row[lang_key])
            ex.append(
                Example(
                    row["user_input"],
                    _labels(prompt_injection=POS, jailbreak=MASK, harmful=MASK),
                    "cyberseceval",
                    key,
                    lang,
                    context_only=row.get("risk_category") == "logic-violating",
                    system_prompt=row["test_case_prompt"],
                )
            )
            text_key = _text_key(row["test_case_prompt"])
            if split >= 3:
                # Once per distinct text: one system prompt serves up to 48 cases, and its copies
                # weighed 48 times in training and counted 48 times in a benign set's FPR.
                if text_key in system_seen:
                    continue
                system_seen.add(text_key)
            ex.append(
                Example(
                    row["test_case_prompt"],
                    _labels(),
                    "cyberseceval_system_prompts",
                    # By text: one system prompt serves many cases (78 of 153 held-out ones were
                    # copies of training ones when they went with their case's group).
                    "csesys:" + (key if split == 1 else text_key),
                    lang,
                    "system_prompts",
                )
            )
    bipia = guard / "injection" / "bipia"
    carriers: list[tuple[str, str]] = []
    for kind in ("email", "code", "table"):
        path = bipia / f"{kind}_train.jsonl"
        for i, row in enumerate(_jsonl(path)):
            row = _obj(_at(path, i), row)
            if isinstance(row.get("context"), str):
                ctx = row["context"]
            else:
                ctx = "\n".join(
                    _texts(f"{_at(path, i)}: field 'code' (no string 'context')", row.get("code", []))
                )
            question = row.get("question", "") if isinstance(row.get("question"), str) else ""
            carriers.append((f"{kind}:{i}", (ctx[:600] + ("\n" + question if question else "")).strip()))
    rng.shuffle(carriers)
    for cid, text in carriers[:1000]:
        ex.append(Example(text, _labels(), "bipia_clean", "bipiaclean:" + cid, "en", "bipia_contexts"))
    # Version 3: an attack family's attacks sit in carriers from the family's own side of the split
    # (in versions 1-2 a held-out attack could sit in a carrier trained on as benign text).
    carriers_by_side: dict[str, list[tuple[str, str]]] = {}
    for cid, text in carriers[:1000]:
        carriers_by_side.setdefault(split_side("bipiaclean:" + cid), []).append((cid, text))
    attack_files = {
        fname: _attack_families(bipia / fname)
        for fname in ("text_attack_train.json", "code_attack_train.json")
    }
    ci = 0
    for families in attack_files.values():
        for family, attacks in families.items():
            hosts = carriers
            if split >= 3:
                hosts = carriers_by_side.get(split_side(f"bipia:{family}")) or carriers
            for attack in attacks:
                for _ in range(3):
                    _, carrier = hosts[ci % len(hosts)]
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
    path = guard / "jailbreak" / "inthewild_jailbreak_llms.json"
    jb: list[str] = list(_texts(f"{path}: unexpected content", _json(path)))
    for f in sorted((guard / "jailbreak" / "dan").glob("*.json")):
        data = _json(f)
        jb.extend(
            str(t).replace("{generator.name}", "ChatGPT")
            for t in (data if isinstance(data, list) else [data])
        )
    components = _jaccard_groups(jb)
    if split >= 3:  # renamed clones: union with the character-3-gram components
        components = _merge_components(components, _near_duplicate_groups(jb))
    for text, comp in zip(jb, components, strict=True):
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
    harmful: list[tuple[str, str, str]] = []  # (text, source, group by row)
    for i, row in enumerate(_csv(harm / "advbench_harmful_behaviors.csv", ("goal",))):
        harmful.append((row["goal"], "advbench", f"advbench:{i}"))
    for i, line in enumerate(_read(harm / "harmbench_prompts.txt").splitlines()):
        if line.strip():
            harmful.append((line.strip(), "harmbench", f"harmbench:{i}"))
    for name in (
        "malicious_uses",
        "information_hazard",
        "discrimination_exclusion_toxicity_hateful_offensive",
    ):
        path = harm / "donotanswer" / f"{name}.jsonl"
        for i, row in enumerate(_jsonl(path)):
            harmful.append((_text(_at(path, i), row, "prompt"), "donotanswer", f"dna:{name}:{i}"))
    if split >= 3:  # one-word edits of a request across the three sources share a group
        components = _near_duplicate_groups([t for t, _, _ in harmful])
        harmful = [(t, src, f"harm:{c}") for (t, src, _), c in zip(harmful, components, strict=True)]
    for text, src, group in harmful:
        ex.append(Example(text, _labels(harmful=POS, toxicity=MASK), src, group))

    # -- toxicity ------------------------------------------------------------------------------
    dav_rows = _csv(guard / "toxicity" / "davidson_labeled_data.csv", ("", "class", "tweet"))
    offensive = [r for r in dav_rows if r["class"] == "1"]
    rng.shuffle(offensive)
    seen: set[str] = set()
    tweets: list[tuple[str, dict[str, str]]] = []
    for r in [x for x in dav_rows if x["class"] != "1"] + offensive[:offensive_sample]:
        text = re.sub(r"\s+", " ", r["tweet"]).strip()
        if text in seen:
            continue
        seen.add(text)
        tweets.append((text, r))
    # Version 3: retweet copies and one-word edits share a group, compared on what the tweet says
    # (handles, links and entities differ between copies: raw, copies scored 0.5 to 0.7).
    dav_groups = (
        [f"dav:c{c}" for c in _near_duplicate_groups([_tweet_core(t) for t, _ in tweets])]
        if split >= 3
        else [f"dav:{r['']}" for _, r in tweets]
    )
    for (text, r), group in zip(tweets, dav_groups, strict=True):
        if r["class"] == "2":
            ex.append(Example(text, _labels(), "davidson_neither", group, "en", "davidson_neither"))
        else:
            src = "davidson_hate" if r["class"] == "0" else "davidson_offensive"
            ex.append(Example(text, _labels(toxicity=POS, harmful=MASK), src, group))
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
        for i, row in enumerate(_jsonl(f)):
            t0.append((f.stem, _text(_at(f, i), row, "prompt")))
    rng.shuffle(t0)
    datasets = _t0_datasets(sorted({fam for fam, _ in t0}))
    for i, (fam, text) in enumerate(t0[:t0_sample]):
        group = f"t0:{fam}:{i % 3}" if split == 1 else f"t0:{datasets[fam]}"
        ex.append(Example(text, _labels(), "t0", group, "en", "t0_prompts"))
    for name in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented_instructions.jsonl"):
        path = corpus / name
        for i, row in enumerate(_jsonl(path)):
            text = _self_instruct_text(_at(path, i), row)
            # Weighted as hard negatives: they *are* instructions to the assistant ("Write a haiku
            # about...", "Rewrite this email..."), the benign twin of an injected instruction.
            ex.append(
                Example(
                    text,
                    _labels(),
                    "self_instruct",
                    f"si:{name}:{i}",
                    "en",
                    "self_instruct",
                    weight=hard_negative_weight,
                )
            )
    path = guard / "benign" / "wildguard_benign.json"
    wildguard = _json(path)
    if not isinstance(wildguard, list):
        raise DataError(f"{path}: expected a list of prompts, got {type(wildguard).__name__}")
    for i, row in enumerate(wildguard):
        ex.append(
            Example(
                _text(_item(path, i), row, "prompt"),
                _labels(),
                "wildguard_benign",
                f"wg:{i}",
                "en",
                "wildguard_benign",
            )
        )
    w = hard_negative_weight
    for tid, text in lookalikes(per_template=8, seed=seed):
        ex.append(Example(text, _labels(), "lookalikes", f"la:{tid}", "en", "lookalikes", weight=w))
    # Hand-written non-English benign sets, each its own benign set in reports; each text one group.
    for name, key, by_lang in (
        ("multilingual_benign", "ml", BENIGN_MULTILINGUAL),
        ("multilingual_chat", "mc", BENIGN_MULTILINGUAL_CHAT),
    ):
        for lang, texts in by_lang.items():
            for i, text in enumerate(texts):
                ex.append(Example(text, _labels(), name, f"{key}:{lang}:{i}", lang, name, weight=w))
    # Short everyday English requests ("Write a short story.", "Tell me a secret."): the shortest,
    # vaguest turns, which no other benign set holds; each text one group.
    for i, text in enumerate(EVERYDAY_REQUESTS):
        ex.append(Example(text, _labels(), "everyday", f"ev:{i}", "en", "everyday", weight=w))
    for e in ex:
        if e.source == "wildguard_benign":
            e.weight = w

    # -- templated additions (steward.guard.synth): each template one group ---------------------
    if synth_per_template > 0:
        for group, lang, text in injection_examples(synth_per_template, seed):
            if split >= 3 and group.startswith("synth:ml_"):
                group = "synth:ml"  # translations of one another (versions 1-2: one group per language)
            ex.append(
                Example(
                    text,
                    _labels(prompt_injection=POS, jailbreak=MASK, harmful=MASK),
                    "synth_injection",
                    group,
                    lang,
                )
            )
        for group, text in benign_examples(synth_per_template, seed):
            ex.append(Example(text, _labels(), "synth_benign", group, "en", "lookalikes", weight=w))
        for group, text in hate_examples(synth_per_template, seed):
            ex.append(Example(text, _labels(toxicity=POS, harmful=MASK), "implicit_hate", group))

    # -- long documents with one injected instruction, labelled per window -----------------------
    # Built from normalised pieces, so the attack span indexes the text the model reads.
    inserts: list[tuple[str, str]] = [
        (e.group, e.model_text)
        for e in ex
        if e.source == "synth_injection" and e.lang == "en" and len(e.text) < 400
    ]
    for families in attack_files.values():
        for family, items in families.items():
            inserts.extend((f"bipia:{family}", _model_text(a)) for a in items)
    # Filler text comes only from training-side carriers and T0 prompts no split uses, so no
    # held-out or validation text reaches training through a long document.
    fillers = [
        _model_text(t)
        for cid, t in carriers[:1000]
        if not is_heldout("bipiaclean:" + cid) and not is_validation("bipiaclean:" + cid)
    ]
    fillers += [_model_text(t) for _, t in t0[t0_sample : t0_sample + 2000]]
    for _ in range(long_docs if inserts and fillers else 0):
        group, attack = inserts[rng.randrange(len(inserts))]
        parts: list[str] = []
        while sum(len(p) for p in parts) < rng.randint(1500, 5000):
            parts.append(fillers[rng.randrange(len(fillers))])
        at = rng.randint(0, len(parts))
        head = "\n\n".join(parts[:at])
        head = head + "\n\n" if head else ""
        tail = "\n\n".join(parts[at:])
        doc = Example(
            head + attack + ("\n\n" + tail if tail else ""),
            _labels(prompt_injection=POS, jailbreak=NEG, harmful=MASK, toxicity=NEG),
            "long_docs",
            group,
            windows=0,
            attack=(len(head), len(head) + len(attack)),
        )
        if doc.model_text != doc.text:  # normalisation is per character, so pieces compose
            raise AssertionError("a long document changed under normalisation; its attack span would drift")
        ex.append(doc)

    # -- requests behind benign text, labelled per window ----------------------------------------
    # A window's embedding is a mean over its tokens, so a paragraph in front of a harmful request
    # dilutes it (validation: 212 harmful requests behind a news paragraph, 4 caught). Training-side
    # harmful requests are placed after (and sometimes before) training-side filler; the windows
    # holding the request are harmful, those clear of it benign. The same number of training-side
    # sensitive-but-benign requests in the same settings keep "a question after a paragraph" from
    # becoming the cue. Own random stream: the examples above do not change with `diluted`.
    drng = random.Random(f"diluted:{seed}")
    train_side = [
        e
        for e in ex
        if e.source in DILUTED_SOURCES and not is_heldout(e.group) and not is_validation(e.group)
    ]
    harmful_side = [e for e in train_side if e.labels["harmful"] == POS]
    benign_side = [e for e in train_side if e.labels["harmful"] == NEG]
    for pool, positive in ((harmful_side, True), (benign_side, False)):
        for _ in range(diluted if pool and fillers else 0):
            request = pool[drng.randrange(len(pool))]
            ex.append(diluted_example(request, fillers, drng, 1.0 if positive else hard_negative_weight))
    return ex


# Requests placed behind benign text (`build_examples(diluted=...)`): harmful ones, and the
# sensitive-but-benign and look-alike ones that share their words.
DILUTED_SOURCES = frozenset({"advbench", "harmbench", "donotanswer", "wildguard_benign", "lookalikes"})


def diluted_example(
    request: Example, fillers: Sequence[str], rng: random.Random, weight: float = 1.0
) -> Example:
    """`request` (harmful or not, by its label) behind 150-1,500 characters of `fillers`, sometimes
    followed by more; a harmful one is labelled per window (`attack_label="harmful"`)."""
    harmful = request.labels["harmful"] == POS
    text_in = request.model_text
    head = _filler(rng, fillers, rng.randint(150, 1500))
    sep = rng.choice(("\n\n", "\n", " "))
    tail = _filler(rng, fillers, rng.randint(100, 1200)) if rng.random() < 0.3 else ""
    text = head + sep + text_in + ("\n\n" + tail if tail else "")
    span = (len(head) + len(sep), len(head) + len(sep) + len(text_in))
    doc = Example(
        text,
        _labels(harmful=POS if harmful else NEG, prompt_injection=MASK, toxicity=MASK),
        "diluted_harmful" if harmful else "diluted_benign",
        request.group,
        windows=0,
        attack=span if harmful else None,
        attack_label="harmful",
        weight=weight,
        benign_set=None if harmful else "diluted_benign",
    )
    if doc.model_text != doc.text:
        raise AssertionError("a diluted request changed under normalisation; its span would drift")
    return doc


def _filler(rng: random.Random, fillers: Sequence[str], chars: int) -> str:
    """Benign filler paragraphs of about `chars` characters, the last one cut at a sentence end."""
    parts: list[str] = []
    while sum(len(x) for x in parts) < chars:
        parts.append(fillers[rng.randrange(len(fillers))])
    text = "\n\n".join(parts)
    if len(text) > chars:
        cut = max(text.rfind(". ", 0, chars), text.rfind("\n", 0, chars))
        text = text[: cut + 1] if cut > 0 else text[:chars]
    return text.strip()


def _self_instruct_text(where: str, row: Any) -> str:
    """A self-instruct task as a request: the instruction, then its first instance's input if any."""
    instruction = _text(where, row, "instruction")
    inst = row.get("instances") or [{}]
    if not isinstance(inst, list):
        raise DataError(f"{where}: field 'instances' must be a list, got {type(inst).__name__}")
    extra = inst[0].get("input", "") if isinstance(inst[0], dict) else ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: the first instance's 'input' must be a string, got {type(extra).__name__}")
    return instruction + ("\n" + extra if extra else "")


def _tweet_core(text: str) -> str:
    """A tweet without its retweet marker, handles, links and HTML entities."""
    core = re.sub(r"\bRT\b|@\w+:?|https?://\S+|&#?\w+;", " ", text)
    return " ".join(core.split()) or text


def _merge_components(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The components of the union of two partitions (each given as a component id per item)."""
    comp = _Components(len(a))
    for labels in (a, b):
        first: dict[int, int] = {}
        for i, c in enumerate(labels):
            if c in first:
                comp.join(i, first[c])
            else:
                first[c] = i
    return comp.labels()


def _model_text(text: str) -> str:
    return normalise(text, decode=False).text


def limit_examples(examples: list[Example], limit: int | None) -> list[Example]:
    """The first `limit` examples of every source (a quick, small but complete run: tests)."""
    if limit is None:
        return examples
    kept: dict[str, int] = {}
    small = []
    for e in examples:
        kept[e.source] = kept.get(e.source, 0) + 1
        if kept[e.source] <= limit:
            small.append(e)
    return small
