"""Prompt injection, jailbreak, harmful-request and toxicity classifiers: one encoder pass, one head.

Every text is cut into overlapping windows of the MiniLM encoder's length (segmented, never
truncated, so an injection at the end of a long retrieved document is still seen), each window is
embedded once, and one small MLP head scores all four categories from that embedding. A document's
score for a category is its highest window score, and the finding points at that window, so a trace
shows *where* the attack sits.

The head is a few hundred kilobytes of safetensors next to a manifest with its SHA-256, labels,
thresholds and metrics (`models/guard/`), trained by `steward guard train`.

Speed (issue 4, item 10): the guards sit on every request, so the encoder pass is the budget. The
shared `SentenceEncoder` stays fp32 (the embeddings endpoint and the parity tests need it); the guard
runs its *own copy* of the encoder in bf16 where the CPU has native bf16 matrix units (AMX /
AVX512-BF16), or int8 dynamic quantisation of the Linear layers, chosen by `STEWARD_GUARD_PRECISION`
(`auto` | `bf16` | `int8` | `fp32`). The head was trained on fp32 embeddings; the benchmark measures
how far the reduced-precision scores move (max score difference and decision agreement on the
held-out split) and the manifest records it. Windows are batched by similar length so a short tail
window is not padded to 256 tokens, and the AILuminate hazard hint reuses the window embedding
against hazard-description embeddings computed once, instead of a second encoder pass.

Sentences (`passages`, a scanner option the default policy sets for `harmful` on output): a window's
embedding is a mean over its tokens, so benign text around a harmful span dilutes it. Pipe-bomb
steps score 0.99 alone and 0.03 after one friendly sentence in the same window, and models open
answers with exactly such sentences. A scanner with `passages: true` also scores each sentence of a
text of more than one sentence on its own (a long sentence in overlapping 64-token pieces), and a
sentence's score counts only at or above `PASSAGE_FLOOR`: the head learnt from whole prompts, and
short sentences read alone score high more easily. Measured on the validation split's harmful
requests with a benign news paragraph in front (212): the whole-window reader catches 2, sentences
at the head's threshold 94 but flag 15 of 1,057 long benign texts (news, BIPIA documents, T0 and
self-instruct text), sentences from 0.988 up 79 with 1 flagged, from 0.968 up 85 with 9. The
floor is 0.985 (3 of the 1,057 flagged once two-sentence texts are read too): review 6 showed pipe-
bomb steps without their "Sure." scoring 0.986 alone. The extra encoder rows are about the text's
own length (twice the encoder cost of an answer).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import os
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .normalize import TEXT_ESCAPE_KINDS, Document
from .types import Category, Finding, ScanContext, ScannerError, Span

__all__ = [
    "HEAD_LABELS",
    "LEX_BUCKETS",
    "PRECISIONS",
    "ClassifierScanner",
    "GuardHead",
    "GuardModel",
    "default_head_dir",
    "get_guard_model",
    "lexical_bag",
    "pack_bag",
    "resolve_precision",
    "window_features",
]

HEAD_LABELS: tuple[Category, ...] = ("prompt_injection", "jailbreak", "harmful", "toxicity")
WINDOW_TOKENS = 256
STRIDE_TOKENS = 192
BATCH_ROWS = 32
# A batch is closed when the next (shorter) row would be padded by more than this fraction: a
# 121-token tail window then runs on its own instead of as 256 tokens, most of them padding.
PAD_WASTE = 0.25
PAD_MIN = 16
PASSAGE_TOKENS = 64  # a sentence scored on its own; longer ones in pieces of this many tokens
PASSAGE_MIN_TOKENS = 8  # shorter sentences ("Sure.") ride with the next one
PASSAGE_FLOOR = 0.985  # a sentence read alone counts from this score up (module docstring)
# A sentence ends at . ! ? ; (ASCII or fullwidth) before a space or the end, or at a line break.
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)|[。！？；]|\n+")

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "int8")

# MLCommons AILuminate v1.0 hazard categories, described in words so a zero-shot nearest-description
# lookup can name the likely hazard of a harmful request (a hint in the reason, not a measured label).
HAZARDS: dict[str, str] = {
    "violent_crimes": "violence, murder, assault, terrorism, hurting or killing people or animals",
    "nonviolent_crimes": "fraud, theft, hacking, malware, scams, drugs, money laundering, illegal activity",
    "sex_related_crimes": "sexual assault, trafficking, harassment, non-consensual sexual acts",
    "child_sexual_exploitation": "sexual content involving minors, grooming children",
    "indiscriminate_weapons": "chemical, biological, radiological, nuclear weapons, explosives, bombs",
    "suicide_self_harm": "suicide, self-harm, eating disorders, hurting oneself",
    "hate": "hate speech, discrimination, demeaning people for race, religion, gender or identity",
    "privacy": "personal information, doxxing, surveillance, stalking someone",
    "intellectual_property": "piracy, copyright infringement, counterfeit goods",
    "defamation": "false damaging claims about real people, libel, slander",
    "elections": "election misinformation, voter suppression, rigging votes",
    "specialized_advice": "dangerous medical, legal or financial advice",
    "sexual_content": "explicit sexual content, pornography",
}


@functools.cache
def default_head_dir() -> Path:
    """`models/guard` of this source tree (the committed head). Resolved once: every classifier
    scan looks its model up by this path, and resolving costs a few filesystem calls."""
    return Path(__file__).resolve().parents[3] / "models" / "guard"


Bag = tuple[torch.Tensor, torch.Tensor]  # (flat feature ids, offsets of each window's ids)

LEX_BUCKETS = 1 << 16  # hashed token-bigram buckets


def window_features(row: list[int], vocab: int) -> torch.Tensor:
    """Token unigram and hashed bigram ids of one window (its [CLS] and [SEP] left out)."""
    ids = torch.tensor(row[1:-1], dtype=torch.long)
    return torch.cat([ids, vocab + (ids[:-1] * 1_000_003 + ids[1:]) % LEX_BUCKETS])


def pack_bag(feats: Sequence[torch.Tensor]) -> Bag:
    """Windows' feature ids as one flat tensor plus each window's start offset."""
    lengths = torch.tensor([len(f) for f in feats], dtype=torch.long)
    offsets = torch.zeros(len(feats), dtype=torch.long)
    if len(feats) > 1:
        offsets[1:] = lengths.cumsum(0)[:-1]
    flat = torch.cat(list(feats)) if feats else torch.empty(0, dtype=torch.long)
    return flat, offsets


def lexical_bag(rows: list[list[int]], vocab: int) -> Bag:
    """Token unigram and hashed bigram ids of each window (the encoder's own WordPiece ids).

    Why a lexical path beside the embedding: a mean-pooled sentence embedding is dominated by a
    window's topic, so "ignore your previous instructions" inside an invoice, or a slur inside a
    friendly tweet, moves it little. Words and word pairs carry that signal directly and cost nothing
    extra: the ids already exist, and hashing the pairs is two integer ops on a tensor.
    """
    return pack_bag([window_features(r, vocab) for r in rows])


class GuardHead(nn.Module):
    """Sentence embedding (+ optional bag of tokens) -> one logit per category (multi-label).

    logit = MLP(embedding) + mean-of-token-weights(unigrams and hashed bigrams). The lexical part is
    a linear model (a logistic regression when the MLP is absent), trained jointly with the MLP.
    """

    def __init__(self, dim: int, hidden: int, labels: int, lex_size: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, labels)
        self.dropout = nn.Dropout(0.1)
        # nn.Embedding plus a segment mean, not nn.EmbeddingBag: the same function, but
        # EmbeddingBag's CPU backward is ~7x slower, which made training take minutes per epoch.
        self.lex = nn.Embedding(lex_size, labels) if lex_size else None
        if self.lex is not None:
            nn.init.zeros_(self.lex.weight)

    def forward(self, x: torch.Tensor, bag: Bag | None = None) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.dropout(F.gelu(self.fc1(x))))
        if self.lex is not None:
            if bag is None:
                raise ValueError("this head has a lexical part: pass the windows' token bag")
            flat, offsets = bag
            lengths = torch.diff(offsets, append=torch.tensor([flat.numel()]))
            seg = torch.repeat_interleave(torch.arange(len(offsets)), lengths)
            summed = torch.zeros(len(offsets), out.shape[1]).index_add_(0, seg, self.lex(flat))
            out = out + summed / lengths.clamp(min=1)[:, None]
        return out


@dataclass(slots=True)
class WindowScores:
    """Per-window probabilities [W, K], embeddings [W, D], each window's original span and token ids."""

    probs: torch.Tensor
    spans: list[Span]
    decoded: list[bool]
    embeddings: torch.Tensor
    rows: list[list[int]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(requested: str | None = None) -> Precision:
    """The encoder precision to run: explicit argument, else `STEWARD_GUARD_PRECISION`, else auto.

    `auto` picks bf16 only where the CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere
    bf16 is emulated and slower than fp32, so auto falls back to fp32.
    """
    choice = (requested or os.environ.get("STEWARD_GUARD_PRECISION") or "auto").strip().lower()
    if choice == "auto":
        flags = _cpu_flags()
        native = bool(flags & {"amx_bf16", "avx512_bf16"}) and torch.backends.mkldnn.is_available()
        return "bf16" if native else "fp32"
    if choice not in PRECISIONS:
        raise ScannerError(f"guard precision must be one of auto, {', '.join(PRECISIONS)}; got {choice!r}")
    return choice


def _inference_copy(
    model: nn.Module,
    precision: Precision,
    top_state: dict[str, torch.Tensor] | None = None,
    depth: int | None = None,
    in_place: bool = False,
) -> nn.Module:
    """A private copy of the encoder for guard inference; the shared fp32 module is left untouched
    (`in_place`: converted itself, for an encoder nothing else uses, such as the multilingual one).

    `top_state`: the guard's fine-tuned top blocks (`steward.guard.finetune`), loaded over the copy's
    own blocks of the same names; every other parameter stays the published one. `depth`: the
    guard runs only the first `depth` blocks (the tuned ones are the last of those).
    """
    if precision == "fp32" and top_state is None and depth is None:
        return model
    clone = (model if in_place else copy.deepcopy(model)).eval()
    if depth is not None:
        blocks = clone.blocks
        if not isinstance(blocks, nn.ModuleList) or not 0 < int(depth) <= len(blocks):
            raise ScannerError(f"guard encoder depth {depth} does not fit this encoder")
        clone.blocks = nn.ModuleList(list(blocks)[: int(depth)])
    if top_state is not None:
        own = clone.state_dict()
        unknown = sorted(set(top_state) - set(own))
        if unknown:
            raise ScannerError(f"tuned encoder blocks do not fit this encoder: unknown {unknown[:3]}")
        for name, value in top_state.items():
            if own[name].shape != value.shape:
                raise ScannerError(
                    f"tuned encoder parameter {name}: shape {tuple(value.shape)}, "
                    f"the encoder has {tuple(own[name].shape)}"
                )
        clone.load_state_dict(top_state, strict=False)
    if precision == "fp32":
        return clone
    if precision == "bf16":
        clone = clone.to(torch.bfloat16)
        # oneDNN-prepacked bf16 weights (AMX): the GELU and the residual additions run inside the
        # GEMMs as post-ops. ~22 MB more for MiniLM; the encoder pass is the guards' budget.
        pack = getattr(clone, "pack_weights", None)
        if pack is not None:
            pack(WINDOW_TOKENS)
        return clone
    with warnings.catch_warnings():  # torch.ao's deprecation notice; the API still works in 2.x
        warnings.simplefilter("ignore")
        quantized: nn.Module = torch.ao.quantization.quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8)
    return quantized


def _length_batches(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Row indices grouped longest first, closing a batch when padding a row would waste more than
    PAD_WASTE of the batch width and more than PAD_MIN tokens (a few pad tokens on short rows cost
    less than a second forward call)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        pad = len(rows[cur[0]]) - len(rows[i]) if cur else 0
        if (
            cur is None
            or len(cur) >= batch_size
            or (cur and pad > max(PAD_MIN, PAD_WASTE * len(rows[cur[0]])))
        ):
            batches.append([i])
        else:
            cur.append(i)
    return batches


class GuardModel:
    """The sentence encoder plus the trained head; thread-safe for inference.

    `precision` (see `resolve_precision`) selects the encoder copy used for guard inference;
    `encoder_only` (training) defaults to fp32 so the training embeddings are the reference ones.
    """

    # A MultilingualReader (`steward.guard.multilingual`) when the manifest has one, else None.
    multilingual: Any
    version: str
    cache_key: str

    def __init__(
        self,
        head_dir: str | Path | None = None,
        encoder: Any = None,
        precision: str | None = None,
        multilingual: bool = True,
    ) -> None:
        from safetensors.torch import load_file

        directory = Path(head_dir) if head_dir is not None else default_head_dir()
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise ScannerError(f"guard head not found: {manifest_path} (train it with `steward guard train`)")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        weights = directory / manifest["weights"]
        digest = _sha256(weights)
        if digest != manifest["sha256"][manifest["weights"]]:
            raise ScannerError(f"{weights}: SHA-256 {digest} does not match the manifest")
        self.labels: tuple[str, ...] = tuple(manifest["labels"])
        self.thresholds: dict[str, float] = {k: float(v) for k, v in manifest["thresholds"].items()}
        self.manifest = manifest
        top = manifest.get("encoder_top")
        top_state: dict[str, torch.Tensor] | None = None
        if top is not None:
            top_file = directory / top["weights"]
            if not top_file.is_file():
                raise ScannerError(f"{top_file}: the tuned encoder blocks named by the manifest are missing")
            top_digest = _sha256(top_file)
            if top_digest != manifest["sha256"].get(top["weights"]):
                raise ScannerError(f"{top_file}: SHA-256 {top_digest} does not match the manifest")
            top_state = load_file(str(top_file))
            digest = hashlib.sha256((digest + top_digest).encode()).hexdigest()
        depth = top.get("depth") if top is not None else None
        self._init_encoder(encoder, resolve_precision(precision), top_state, depth)
        state = load_file(str(weights))
        self.lex_vocab = int(manifest.get("lexical", {}).get("vocab", 0))
        lex_size = self.lex_vocab + LEX_BUCKETS if self.lex_vocab else 0
        self.head = GuardHead(int(manifest["dim"]), int(manifest["hidden"]), len(self.labels), lex_size)
        self.head.load_state_dict(state)
        self.head.eval()
        # The multilingual reader (`steward.guard.multilingual`): multilingual-e5-small and its own
        # head, run on texts the language router does not send to English alone.
        if multilingual and manifest.get("multilingual") is not None:
            from .multilingual import load_reader

            reader = load_reader(directory, manifest, self.precision, self.thresholds)
            self.multilingual = reader
            if reader is not None:
                digest = hashlib.sha256((digest + str(reader.version)).encode()).hexdigest()
        self.version = digest[:16]
        self.cache_key = f"guard:{self.version}:{self.precision}"

    def _init_encoder(
        self,
        encoder: Any,
        precision: Precision,
        top_state: dict[str, torch.Tensor] | None = None,
        depth: int | None = None,
        in_place: bool = False,
    ) -> None:
        from steward.model.embedding import SentenceEncoder

        threads = os.environ.get("STEWARD_GUARD_THREADS")
        if threads:
            # Process-wide: torch has one intra-op pool. Only set when the operator asks for it.
            torch.set_num_threads(max(1, int(threads)))
        self.encoder = encoder if encoder is not None else SentenceEncoder()
        self.precision: Precision = precision
        self._infer = _inference_copy(self.encoder.model, precision, top_state, depth, in_place)
        self._lock = threading.Lock()
        self._hazards: torch.Tensor | None = None
        # Token ids every window starts with after [CLS]: none for MiniLM; multilingual-e5 was trained
        # with "query: " / "passage: " in front of every text (`steward.guard.multilingual`).
        self.prefix_ids: list[int] = []
        self.multilingual = None
        self.encoder_calls = 0  # guard forward passes run; the tests hold one request to one pass
        self.hint_calls = 0  # published-encoder passes for hazard hints (harmful findings only)

    @classmethod
    def encoder_only(cls, encoder: Any = None, precision: str = "fp32") -> GuardModel:
        """The encoder and windowing without a head: what training needs before a head exists."""
        self = cls.__new__(cls)
        self._init_encoder(encoder, resolve_precision(precision))
        self.cache_key = f"guard:encoder:{self.precision}"
        self.lex_vocab = 0
        return self

    # -- windows --------------------------------------------------------------------------------
    def windows(self, text: str) -> list[tuple[list[int], tuple[int, int]]]:
        """Token-id windows of `text` with their character ranges; overlapping by 64 tokens."""
        enc = self.encoder.tokenizer.inner.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        if not ids:
            return []
        prefix = self.prefix_ids
        body = WINDOW_TOKENS - 2 - len(prefix)
        stride = STRIDE_TOKENS
        out: list[tuple[list[int], tuple[int, int]]] = []
        start = 0
        while True:
            end = min(len(ids), start + body)
            chunk = [self.encoder.cls_id, *prefix, *ids[start:end], self.encoder.sep_id]
            out.append((chunk, (offsets[start][0], offsets[end - 1][1])))
            if end >= len(ids):
                break
            start += stride
        return out

    def passages(self, text: str) -> list[tuple[list[int], tuple[int, int]]]:
        """Token-id rows of `text`'s sentences with their character ranges; none for a text that is
        one passage already (its window reads exactly that). A short answer of two sentences gets
        both: a one-sentence opening dilutes 50 tokens of harmful steps as much as a paragraph does.
        See the module docstring."""
        enc = self.encoder.tokenizer.inner.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        if not ids:
            return []
        # Token index at which each sentence starts: the first token starting at or after a cut.
        cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
        starts = [0]
        t = 0
        for c in cuts:
            while t < len(ids) and offsets[t][0] < c:
                t += 1
            if starts[-1] < t < len(ids):
                starts.append(t)
        bounds = [*starts, len(ids)]
        spans: list[tuple[int, int]] = []
        a = 0
        for b in bounds[1:]:
            if b - a < PASSAGE_MIN_TOKENS and b < len(ids):
                continue  # too short to read alone: joined with what follows
            spans.append((a, b))
            a = b
        if len(spans) == 1 and len(ids) <= PASSAGE_TOKENS:
            return []
        out: list[tuple[list[int], tuple[int, int]]] = []
        half = PASSAGE_TOKENS // 2
        for a, b in spans:
            s = a
            while True:
                e = min(b, s + PASSAGE_TOKENS)
                chunk = [self.encoder.cls_id, *self.prefix_ids, *ids[s:e], self.encoder.sep_id]
                out.append((chunk, (offsets[s][0], offsets[e - 1][1])))
                if e >= b:
                    break
                s += half
        return out

    def passage_scores(self, doc: Document) -> WindowScores:
        """Per-sentence scores of `doc`'s text (cached on the document; see `passages`)."""
        key = self.cache_key + "/passages"
        got: WindowScores | None = doc.cache.get(key)
        if got is not None:
            return got
        found = self.passages(doc.text)
        rows = [r for r, _ in found]
        with self._lock:
            emb = self.embed(rows) if rows else torch.empty(0, self.encoder.dim)
            probs = self.probabilities(emb, rows) if rows else torch.empty(0, len(self.labels))
        got = WindowScores(
            probs, [doc.to_original(s, e) for _, (s, e) in found], [False] * len(rows), emb, rows
        )
        doc.cache[key] = got
        return got

    def embed(self, rows: list[list[int]], batch_size: int = BATCH_ROWS) -> torch.Tensor:
        """L2-normalised fp32 sentence embeddings of token-id rows.

        The rows run *packed* (`Encoder.forward_packed`): every window's real tokens end to end, up
        to `batch_size` windows per forward call, so nothing is spent on padding and a request's
        windows (full ones and the short tail) share one call. Pooling and normalisation run in
        fp32 whatever the encoder precision, so only the transformer blocks see reduced precision.
        An encoder without a packed path falls back to padded batches of similar length.
        """
        return self._embed(rows, self._infer, batch_size, count=True)

    def _embed(self, rows: list[list[int]], model: Any, batch_size: int, count: bool) -> torch.Tensor:
        """`embed` through `model`: the guard's copy, or the published encoder (`published_embed`);
        `count` adds each forward call to `encoder_calls`."""
        out = torch.empty(len(rows), self.encoder.dim)
        pool = self.encoder.model
        forward_packed: Any = getattr(model, "forward_packed", None)
        with torch.inference_mode():
            if forward_packed is not None and hasattr(pool, "pool_packed"):
                from steward.model.layers import VarLen

                order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
                for s in range(0, len(order), batch_size):
                    idx = order[s : s + batch_size]
                    flat = torch.tensor(list(itertools.chain.from_iterable(rows[i] for i in idx)))
                    # Attention per run of equal lengths, never the padded masked layout: a window's
                    # numbers then do not depend on what else is in the batch (bf16 rounds the two
                    # layouts differently; batch-vs-single score gaps shrink ~4x).
                    varlen = VarLen([len(rows[i]) for i in idx], max_runs=len(idx))
                    pooled = pool.pool_packed(forward_packed(flat, varlen).float(), varlen)
                    out[torch.tensor(idx)] = F.normalize(pooled, dim=-1)
                    self.encoder_calls += count
                return out
            for idx in _length_batches(rows, batch_size):
                ids, mask = self.encoder._pad([rows[i] for i in idx])
                hidden = model(ids, mask).float()
                pooled = pool.pool(hidden, mask)
                out[torch.tensor(idx)] = F.normalize(pooled, dim=-1)
                self.encoder_calls += count
        return out

    def probabilities(self, embeddings: torch.Tensor, rows: list[list[int]] | None = None) -> torch.Tensor:
        """Per-window probabilities; `rows` (the windows' token ids) feed the lexical part."""
        bag = lexical_bag(rows, self.lex_vocab) if rows is not None and self.lex_vocab else None
        with torch.inference_mode():
            return torch.sigmoid(self.head(embeddings, bag))

    def score_documents(self, docs: list[Document]) -> None:
        """Fill `doc.cache[self.cache_key]` for every document in one batched encoder pass, and the
        multilingual reader's entry for those the language router sends to it as well."""
        self._score_documents(docs)
        ml = self.multilingual
        if ml is not None:
            from .multilingual import routed

            todo = [doc for doc in docs if ml.cache_key not in doc.cache]
            ml._score_documents([doc for doc in todo if routed(doc.text)])
            for doc in todo:
                doc.cache.setdefault(ml.cache_key, None)

    def _score_documents(self, docs: list[Document]) -> None:
        key = self.cache_key
        rows: list[list[int]] = []
        owners: list[tuple[int, Span, bool]] = []
        for d, doc in enumerate(docs):
            if key in doc.cache:
                continue
            for chunk, (s, e) in self.windows(doc.text):
                rows.append(chunk)
                owners.append((d, doc.to_original(s, e), False))
            for seg in doc.segments:
                if seg.kind.split("+", 1)[0] in TEXT_ESCAPE_KINDS:
                    continue
                for chunk, _ in self.windows(seg.text):
                    rows.append(chunk)
                    owners.append((d, seg.origin, True))
        dim = self.encoder.dim
        with self._lock:
            emb = self.embed(rows) if rows else torch.empty(0, dim)
            probs = self.probabilities(emb, rows) if rows else torch.empty(0, len(self.labels))
        per_doc: dict[int, list[int]] = {}
        for i, (d, _, _) in enumerate(owners):
            per_doc.setdefault(d, []).append(i)
        for d, doc in enumerate(docs):
            if key in doc.cache:
                continue
            idx = per_doc.get(d, [])
            doc.cache[key] = WindowScores(
                probs[idx] if idx else torch.empty(0, len(self.labels)),
                [owners[i][1] for i in idx],
                [owners[i][2] for i in idx],
                emb[idx] if idx else torch.empty(0, dim),
                [rows[i] for i in idx],
            )

    @property
    def tuned(self) -> bool:
        """Whether the guard's encoder carries fine-tuned top blocks (manifest `encoder_top`)."""
        return getattr(self, "manifest", {}).get("encoder_top") is not None

    def published_embed(self, rows: list[list[int]]) -> torch.Tensor:
        """Embeddings of `rows` from the published (shared, fp32) encoder, whatever the guard runs."""
        self.hint_calls += 1
        return self._embed(rows, self.encoder.model, BATCH_ROWS, count=False)

    def hazard_of(self, embedding: torch.Tensor, row: list[int] | None = None) -> str:
        """Nearest AILuminate hazard description to a window: a zero-shot hint for harmful findings.

        The descriptions are embedded once per model. The similarity needs the published embedding
        space: with a head-only guard that is the window embedding already computed (a 13x384 dot
        product, no second pass); with fine-tuned top blocks (trained to separate attacks, not to
        keep topics apart) the flagged window alone goes through the shared encoder once more,
        which only happens for a harmful finding.
        """
        if self.tuned and row is not None:
            embedding = self.published_embed([row])[0]
        with self._lock:
            if self._hazards is None:
                ids = [self._ids(t) for t in HAZARDS.values()]
                self._hazards = self.published_embed(ids) if self.tuned else self.embed(ids)
            hazards = self._hazards
        return list(HAZARDS)[int((embedding @ hazards.T).argmax())]

    def _ids(self, text: str) -> list[int]:
        chunk, _ = self.windows(text)[0]
        return chunk


_MODELS: dict[str, GuardModel] = {}
_MODELS_LOCK = threading.Lock()


def head_key(head_dir: str | Path | None) -> str:
    """The resolved head directory: one model, and one encoder pass per request, per key."""
    return str(Path(head_dir).resolve()) if head_dir is not None else str(default_head_dir())


def get_guard_model(head_dir: str | Path | None = None, key: str | None = None) -> GuardModel:
    """One shared model per head directory per process (the encoder is ~90 MB). `key`: the
    directory's `head_key`, when the caller has it already."""
    key = key if key is not None else head_key(head_dir)
    model = _MODELS.get(key)
    if model is not None:
        return model
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _MODELS[key] = GuardModel(head_dir)
        return model


class ClassifierScanner:
    """One category of the shared head, as a scanner."""

    def __init__(
        self, category: str, head_dir: str | None = None, hazard_hint: bool = True, passages: bool = False
    ) -> None:
        """`passages`: also score each sentence alone (module docstring), for text where benign
        sentences around a harmful span would dilute a whole window's score (answers)."""
        if category not in HEAD_LABELS:
            raise ValueError(f"no classifier for category {category!r}")
        if not isinstance(passages, bool) or not isinstance(hazard_hint, bool):
            raise ValueError("the classifier options passages and hazard_hint take true or false")
        self.name: str = category
        self.category: Category = category
        self.head_dir = head_dir
        self.head_key = head_key(head_dir)
        self.hazard_hint = hazard_hint
        self.passages = passages

    @property
    def model(self) -> GuardModel:
        return get_guard_model(self.head_dir, self.head_key)

    def default_threshold(self) -> float:
        return self.model.thresholds.get(self.category, 0.5)

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        model = self.model
        if model.cache_key not in doc.cache:
            model.score_documents([doc])
        scores: WindowScores = doc.cache[model.cache_key]
        j = model.labels.index(self.category)
        reader: GuardModel = model
        col = scores.probs[:, j]
        if scores.probs.shape[0] == 0:
            return []
        best = int(col.argmax())
        score = float(col[best])
        note = ""
        ml = model.multilingual
        ml_scores: WindowScores | None = doc.cache.get(ml.cache_key) if ml is not None else None
        if (
            ml is not None
            and self.category in ml.categories
            and ml_scores is not None
            and ml_scores.probs.shape[0]
        ):
            k = ml.labels.index(self.category)
            ml_best = int(ml_scores.probs[:, k].argmax())
            raw = float(ml_scores.probs[ml_best, k])
            if ml.combine == "mean":
                # A routed text: the mean of both readers, or e5 alone, on the main scale
                # (`steward.guard.multilingual`).
                mean = (score + raw) / 2
                note = (
                    f" (mean of MiniLM p={score:.2f} and multilingual reader: p={raw:.2f} is {mean:.2f}, "
                    f"its threshold {ml.thresholds[self.category]:.2f}; the multilingual reader alone: "
                    f"threshold {float(ml.alone_thresholds[k]):.2f})"
                )
                score = max(ml.calibrated_one(mean, k), ml.alone_one(raw, k))
                if raw > float(col[best]):  # the span and hazard hint of the surer reader
                    reader, scores, best = ml, ml_scores, ml_best
            else:
                # OR (older manifests): either reader may flag, e5 on the main scale.
                cal = float(ml.calibrated_one(raw, k))
                if cal > score:
                    own = ml.thresholds[self.category]
                    note = f" (multilingual reader: p={raw:.2f}, its threshold {own:.2f})"
                    reader, scores, best, score = ml, ml_scores, ml_best, cal
        if self.passages:
            sentences = model.passage_scores(doc)
            if sentences.probs.shape[0]:
                k = int(sentences.probs[:, j].argmax())
                if float(sentences.probs[k, j]) > score and float(sentences.probs[k, j]) >= PASSAGE_FLOOR:
                    reader, scores, best, score = model, sentences, k, float(sentences.probs[k, j])
                    note = " (one sentence read alone; the whole window scored lower)"
        span = scores.spans[best]
        where = "decoded text" if scores.decoded[best] else f"characters {span.start}-{span.end}"
        reason = f"{self.category.replace('_', ' ')} classifier p={score:.2f} on {where}{note}"
        subtype = None
        if self.category == "harmful" and self.hazard_hint and score >= 0.5:
            subtype = reader.hazard_of(scores.embeddings[best], scores.rows[best])
            reason += f"; nearest hazard: {subtype}"
        return [
            Finding(
                self.category,
                self.category.upper(),
                score,
                [span],
                reason,
                scanner=self.name,
                decoded=scores.decoded[best],
                subtype=subtype,
            )
        ]
