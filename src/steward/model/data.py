"""Training-data preparation with responsible practice.

Steps, in order, each counted for the data card:
1. load documents from a corpus directory (T0 prompt/completion pairs, self-instruct instructions,
   plain text such as Tiny Shakespeare), each tagged with its source;
2. scrub personal data through the `PIIScrubber` protocol (a regex scrubber here; the guard's PII
   detector plugs into the same protocol);
3. remove exact duplicates (after Unicode/whitespace/case normalisation) and near-duplicates
   (MinHash over word 5-gram shingles with LSH banding, confirmed by exact Jaccard);
4. split into train / held-out deterministically by a keyed hash, per source, *after* de-duplication
   so that no near-copy of a held-out document is trained on;
5. write a data card with the sections of "Datasheets for Datasets" (Gebru et al., 2021).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# ---------------------------------------------------------------------------------------------
# Documents


@dataclass
class Document:
    source: str  # e.g. "t0/ag_news_classify", "self_instruct/seed", "text/tinyshakespeare"
    prompt: str  # empty for plain text
    completion: str  # the text to model (the answer, or the whole text for plain documents)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pair(self) -> bool:
        return bool(self.prompt)

    def key_text(self) -> str:
        return f"{self.prompt}\n{self.completion}"


class DataError(ValueError):
    pass


EOT_MARK = "<|endoftext|>"


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not UTF-8 text ({exc.reason}, byte {exc.start} of the line)"
            ) from exc
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, row


def load_corpus(corpus_dir: str | Path, *, text_chunk_chars: int = 2000) -> list[Document]:
    """Load every supported file under `corpus_dir`.

    - `t0_tasks/*.jsonl`: {"prompt", "completion"} pairs (a trailing <|endoftext|> is stripped);
    - `self_instruct*.jsonl`: {"instruction", "instances": [{"input", "output"}]};
    - `*.txt`: plain text, cut at blank lines into chunks of about `text_chunk_chars`.
    """
    root = Path(corpus_dir)
    if not root.is_dir():
        raise DataError(f"corpus directory not found: {root}")
    docs: list[Document] = []
    for path in sorted((root / "t0_tasks").glob("*.jsonl")):
        task = path.stem
        for _, row in _read_jsonl(path):
            prompt, completion = row.get("prompt"), row.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                continue
            completion = completion.removesuffix(EOT_MARK).strip()
            if completion:
                docs.append(Document(f"t0/{task}", prompt.strip(), completion, {"task": task}))
    for path in sorted(root.glob("self_instruct*.jsonl")):
        name = path.stem.removeprefix("self_instruct_")
        for lineno, row in _read_jsonl(path):
            instruction = row.get("instruction")
            if not isinstance(instruction, str):
                continue
            instances = row.get("instances") or []
            if not isinstance(instances, list):
                raise DataError(f"{path}:{lineno}: 'instances' must be a list of objects")
            for inst in instances:
                if not isinstance(inst, dict):
                    raise DataError(f"{path}:{lineno}: each of 'instances' must be an object")
                for key in ("input", "output"):
                    if inst.get(key) is not None and not isinstance(inst[key], str):
                        raise DataError(f"{path}:{lineno}: instance {key!r} must be a string")
                inp = (inst.get("input") or "").strip()
                out = (inst.get("output") or "").strip()
                if out:
                    prompt = instruction.strip() + (f"\n\n{inp}" if inp else "")
                    docs.append(Document(f"self_instruct/{name}", prompt, out))
    for path in sorted(root.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for chunk in _chunk_text(text, text_chunk_chars):
            docs.append(Document(f"text/{path.stem}", "", chunk))
    if not docs:
        raise DataError(f"no documents found under {root}")
    return docs


def _chunk_text(text: str, size: int) -> list[str]:
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        length += len(para) + 2
        if length >= size:
            chunks.append("\n\n".join(current))
            current, length = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


# ---------------------------------------------------------------------------------------------
# PII scrubbing


@dataclass(frozen=True)
class Redaction:
    entity: str
    start: int
    end: int


class PIIScrubber(Protocol):
    """Replaces personal data in text. The guard's PII detector implements this same protocol."""

    def scrub(self, text: str) -> tuple[str, list[Redaction]]: ...


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


class RegexPIIScrubber:
    """High-precision patterns for the identifiers that matter most in web-scraped text.

    Each match is replaced by `<ENTITY>`; card-like numbers must pass the Luhn check so that ISBNs,
    order numbers and years in the T0 news text are left alone.
    """

    PATTERNS: Sequence[tuple[str, re.Pattern[str]]] = (
        ("URL_CREDENTIALS", re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@[^\s]+", re.I)),
        ("EMAIL_ADDRESS", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
        ("US_SSN", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")),
        ("CREDIT_CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
        (
            "PHONE_NUMBER",
            re.compile(
                r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}\b"
                r"|\+\d{7,14}\b|\b1[3-9]\d{9}\b"
            ),
        ),
        (
            "IP_ADDRESS",
            re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"),
        ),
    )

    def scrub(self, text: str) -> tuple[str, list[Redaction]]:
        found: list[Redaction] = []
        taken = [False] * len(text)
        for entity, pattern in self.PATTERNS:
            for m in pattern.finditer(text):
                if any(taken[m.start() : m.end()]):
                    continue
                if entity == "CREDIT_CARD":
                    digits = re.sub(r"\D", "", m.group())
                    if not (13 <= len(digits) <= 19 and _luhn_ok(digits)):
                        continue
                found.append(Redaction(entity, m.start(), m.end()))
                taken[m.start() : m.end()] = [True] * (m.end() - m.start())
        if not found:
            return text, []
        found.sort(key=lambda r: r.start)
        parts: list[str] = []
        pos = 0
        for r in found:
            parts.append(text[pos : r.start])
            parts.append(f"<{r.entity}>")
            pos = r.end
        parts.append(text[pos:])
        return "".join(parts), found


def scrub_documents(docs: list[Document], scrubber: PIIScrubber) -> tuple[list[Document], Counter[str]]:
    counts: Counter[str] = Counter()
    out: list[Document] = []
    for d in docs:
        p, rp = scrubber.scrub(d.prompt) if d.prompt else (d.prompt, [])
        c, rc = scrubber.scrub(d.completion)
        counts.update(r.entity for r in (*rp, *rc))
        out.append(Document(d.source, p, c, d.meta))
    return out, counts


# ---------------------------------------------------------------------------------------------
# De-duplication

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
_MERSENNE = np.uint64((1 << 61) - 1)


def normalise(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _shingles(text: str, n: int) -> set[int]:
    words = _WORD.findall(normalise(text))
    if len(words) < n:
        grams = [" ".join(words)] if words else []
    else:
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 3 for g in grams}


@dataclass
class DedupReport:
    exact_removed: int = 0
    near_removed: int = 0
    near_threshold: float = 0.8
    examples: list[tuple[str, str]] = field(default_factory=list)


def deduplicate(
    docs: list[Document],
    *,
    threshold: float = 0.8,
    shingle: int = 5,
    num_perm: int = 64,
    bands: int = 16,
    seed: int = 1234,
) -> tuple[list[Document], DedupReport]:
    """Drop exact and near-duplicate documents, keeping the first occurrence.

    MinHash estimates Jaccard similarity of shingle sets; LSH with `bands` bands of
    `num_perm/bands` rows proposes candidate pairs (probability of proposing a pair of similarity
    s is 1-(1-s^r)^b, ≈0.99 at s=0.8 for 16×4), and every candidate is confirmed with the exact
    Jaccard so that no false positive removes a document.
    """
    report = DedupReport(near_threshold=threshold)
    seen: set[str] = set()
    unique: list[Document] = []
    for d in docs:
        h = hashlib.sha256(normalise(d.key_text()).encode()).hexdigest()
        if h in seen:
            report.exact_removed += 1
            continue
        seen.add(h)
        unique.append(d)

    rows = num_perm // bands
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_MERSENNE), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_MERSENNE), size=num_perm, dtype=np.uint64)
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    shingle_sets: list[set[int]] = []
    kept: list[Document] = []
    for d in unique:
        s = _shingles(d.key_text(), shingle)
        if not s:
            kept.append(d)
            shingle_sets.append(s)
            continue
        x = np.fromiter(s, dtype=np.uint64, count=len(s))
        # (a*x + b) mod p, computed in uint64 with wrap-around; a universal-enough family for
        # MinHash since x < 2^61 and we only need consistent pseudo-random permutations.
        sig = ((x[:, None] * a[None, :] + b[None, :]) % _MERSENNE).min(axis=0)
        keys = [(i, sig[i * rows : (i + 1) * rows].tobytes()) for i in range(bands)]
        duplicate_of = -1
        candidates = {j for k in keys for j in buckets.get(k, ())}
        for j in sorted(candidates):
            other = shingle_sets[j]
            inter = len(s & other)
            if inter / (len(s) + len(other) - inter) >= threshold:
                duplicate_of = j
                break
        if duplicate_of >= 0:
            report.near_removed += 1
            if len(report.examples) < 5:
                report.examples.append((d.source, kept[duplicate_of].source))
            continue
        idx = len(kept)
        kept.append(d)
        shingle_sets.append(s)
        for k in keys:
            buckets[k].append(idx)
    return kept, report


# ---------------------------------------------------------------------------------------------
# Split


def split_documents(
    docs: list[Document], heldout_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Per-source deterministic split by a keyed hash of the document text.

    Hash-based assignment does not depend on file order or on which other documents exist, so
    adding data never moves an existing document between train and held-out.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train: list[Document] = []
    heldout: list[Document] = []
    for d in docs:
        h = hashlib.blake2b(d.key_text().encode(), digest_size=8, key=str(seed).encode()).digest()
        u = int.from_bytes(h, "little") / 2**64
        (heldout if u < heldout_fraction else train).append(d)
    return train, heldout


# ---------------------------------------------------------------------------------------------
# Data card


def file_hashes(corpus_dir: str | Path) -> dict[str, str]:
    root = Path(corpus_dir)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class PreparedData:
    train: list[Document]
    heldout: list[Document]
    card: dict[str, Any]


def prepare(
    corpus_dir: str | Path,
    *,
    heldout_fraction: float = 0.1,
    seed: int = 1234,
    scrubber: PIIScrubber | None = None,
    near_dup_threshold: float = 0.8,
) -> PreparedData:
    docs = load_corpus(corpus_dir)
    loaded = Counter(d.source.split("/")[0] for d in docs)
    docs, pii_counts = scrub_documents(docs, scrubber or RegexPIIScrubber())
    docs, dedup = deduplicate(docs, threshold=near_dup_threshold, seed=seed)
    train, heldout = split_documents(docs, heldout_fraction, seed)
    card = {
        "corpus_dir": str(corpus_dir),
        "source_files_sha256": file_hashes(corpus_dir),
        "documents_loaded": sum(loaded.values()),
        "documents_by_source_family": dict(loaded),
        "pii_redactions": dict(pii_counts),
        "pii_scrubber": type(scrubber or RegexPIIScrubber()).__name__,
        "dedup": asdict(dedup),
        "documents_after_dedup": len(docs),
        "train_documents": len(train),
        "heldout_documents": len(heldout),
        "heldout_fraction": heldout_fraction,
        "split_seed": seed,
        "sources": sorted({d.source for d in docs}),
    }
    return PreparedData(train, heldout, card)


def write_data_card(card: dict[str, Any], directory: str | Path, extra: dict[str, Any]) -> None:
    """Write DATA_CARD.md (Datasheets for Datasets sections) and data_card.json."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    full = {**card, **extra}
    (out / "data_card.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    pii = ", ".join(f"{k}: {v}" for k, v in sorted(card["pii_redactions"].items())) or "none found"
    fams = ", ".join(f"{k}: {v}" for k, v in sorted(card["documents_by_source_family"].items()))
    text = f"""# Data card

Written by `steward train` beside the run, following the sections of *Datasheets for Datasets*
(Gebru et al., 2021).

## Motivation
Training text for Steward's small built-in chat model: a demonstrator that runs on a CPU, follows the
chat template and answers T0-style task prompts. It is not meant to be knowledgeable or safe on its
own; Steward's guards sit in front of it.

## Composition
- Documents loaded: {card["documents_loaded"]} ({fams}).
- After PII scrubbing and de-duplication: {card["documents_after_dedup"]}.
- Train: {card["train_documents"]} documents; held-out: {card["heldout_documents"]} (fraction
  {card["heldout_fraction"]}, split per document by a keyed hash, seed {card["split_seed"]}).
- Instances are prompt/completion pairs (T0 task templates, self-instruct instructions) rendered
  with the chat template, and plain-text chunks (Tiny Shakespeare).
- Sources: {len(card["sources"])} ({", ".join(card["sources"][:8])}, ...).

## Collection process
Copied unchanged from public repositories (see `../shared/data/README.md`): T0 task pairs and
self-instruct instructions from yizhongw/self-instruct (Apache-2.0; underlying datasets keep their
own terms), Tiny Shakespeare from karpathy/char-rnn (public-domain text). SHA-256 of every source file
is recorded in `data_card.json`.

## Preprocessing / cleaning / labelling
- PII scrubbing with `{card["pii_scrubber"]}` (emails, phone numbers, Luhn-valid card numbers, US
  SSNs, IP addresses, URLs with credentials replaced by `<ENTITY>` placeholders). Redactions: {pii}.
- Exact de-duplication after NFKC, case folding and whitespace collapsing: removed
  {card["dedup"]["exact_removed"]}.
- Near-duplicate removal (MinHash over word 5-grams, LSH 16×4, confirmed Jaccard ≥
  {card["dedup"]["near_threshold"]}): removed {card["dedup"]["near_removed"]}. De-duplication runs
  before the split, so the held-out set holds no near-copy of a training document.

## Uses
Language-model pre-training of the built-in demonstrator; held-out loss/perplexity and the
T0 classification accuracy reported in the model card come from the held-out split only. Not for
evaluating guards (see `guard/` data) or bias (see `eval/`).

## Distribution
The raw data is not redistributed by this project; the run records hashes of what it read.

## Maintenance
Re-run `steward train CONFIG` to regenerate; the data card and manifest change with the data.
"""
    (out / "DATA_CARD.md").write_text(text)
