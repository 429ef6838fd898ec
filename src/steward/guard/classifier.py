"""Prompt injection, jailbreak, harmful-request and toxicity classifiers: one encoder pass, one head.

Every text is cut into overlapping windows of the MiniLM encoder's length (segmented, never
truncated, so an injection at the end of a long retrieved document is still seen), each window is
embedded once, and one small MLP head scores all four categories from that embedding. A document's
score for a category is its highest window score, and the finding points at that window, so a trace
shows *where* the attack sits.

The head is a few hundred kilobytes of safetensors next to a manifest with its SHA-256, labels,
thresholds and metrics (`models/guard/`), trained by `steward guard train`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .normalize import Document
from .types import Category, Finding, ScanContext, ScannerError, Span

__all__ = [
    "HEAD_LABELS",
    "ClassifierScanner",
    "GuardHead",
    "GuardModel",
    "default_head_dir",
    "get_guard_model",
]

HEAD_LABELS: tuple[Category, ...] = ("prompt_injection", "jailbreak", "harmful", "toxicity")
WINDOW_TOKENS = 256
STRIDE_TOKENS = 192

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


def default_head_dir() -> Path:
    """`models/guard` of this source tree (the committed head)."""
    return Path(__file__).resolve().parents[3] / "models" / "guard"


class GuardHead(nn.Module):
    """Sentence embedding -> one logit per category (multi-label)."""

    def __init__(self, dim: int, hidden: int, labels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, labels)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.dropout(F.gelu(self.fc1(x))))
        return out


@dataclass(slots=True)
class WindowScores:
    """Per-window probabilities [W, K] and each window's span in the original text."""

    probs: torch.Tensor
    spans: list[Span]
    decoded: list[bool]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class GuardModel:
    """The sentence encoder plus the trained head; thread-safe for inference."""

    def __init__(self, head_dir: str | Path | None = None, encoder: Any = None) -> None:
        from safetensors.torch import load_file

        from steward.model.embedding import SentenceEncoder

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
        self.encoder = encoder if encoder is not None else SentenceEncoder()
        state = load_file(str(weights))
        self.head = GuardHead(int(manifest["dim"]), int(manifest["hidden"]), len(self.labels))
        self.head.load_state_dict(state)
        self.head.eval()
        self.version = digest[:16]
        self._lock = threading.Lock()
        self._hazards: torch.Tensor | None = None

    @classmethod
    def encoder_only(cls, encoder: Any = None) -> GuardModel:
        """The encoder and windowing without a head: what training needs before a head exists."""
        from steward.model.embedding import SentenceEncoder

        self = cls.__new__(cls)
        self.encoder = encoder if encoder is not None else SentenceEncoder()
        self._lock = threading.Lock()
        self._hazards = None
        return self

    # -- windows --------------------------------------------------------------------------------
    def windows(self, text: str) -> list[tuple[list[int], tuple[int, int]]]:
        """Token-id windows of `text` with their character ranges; overlapping by 64 tokens."""
        enc = self.encoder.tokenizer.inner.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        if not ids:
            return []
        body = WINDOW_TOKENS - 2
        stride = STRIDE_TOKENS
        out: list[tuple[list[int], tuple[int, int]]] = []
        start = 0
        while True:
            end = min(len(ids), start + body)
            chunk = [self.encoder.cls_id, *ids[start:end], self.encoder.sep_id]
            out.append((chunk, (offsets[start][0], offsets[end - 1][1])))
            if end >= len(ids):
                break
            start += stride
        return out

    def embed(self, rows: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised sentence embeddings of token-id rows, batched by similar length."""
        out = torch.empty(len(rows), self.encoder.dim)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                ids, mask = self.encoder._pad([rows[i] for i in idx])
                model = self.encoder.model
                pooled = model.pool(model(ids, mask), mask).float()
                out[torch.tensor(idx)] = F.normalize(pooled, dim=-1)
        return out

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.sigmoid(self.head(embeddings))

    def score_documents(self, docs: list[Document]) -> None:
        """Fill `doc.cache['guard']` for every document in one batched encoder pass."""
        rows: list[list[int]] = []
        owners: list[tuple[int, Span, bool]] = []
        for d, doc in enumerate(docs):
            if "guard" in doc.cache:
                continue
            for chunk, (s, e) in self.windows(doc.text):
                rows.append(chunk)
                owners.append((d, doc.to_original(s, e), False))
            for seg in doc.segments:
                for chunk, _ in self.windows(seg.text):
                    rows.append(chunk)
                    owners.append((d, seg.origin, True))
        with self._lock:
            probs = self.probabilities(self.embed(rows)) if rows else torch.empty(0, len(self.labels))
        per_doc: dict[int, list[int]] = {}
        for i, (d, _, _) in enumerate(owners):
            per_doc.setdefault(d, []).append(i)
        for d, doc in enumerate(docs):
            if "guard" in doc.cache:
                continue
            idx = per_doc.get(d, [])
            doc.cache["guard"] = WindowScores(
                probs[idx] if idx else torch.empty(0, len(self.labels)),
                [owners[i][1] for i in idx],
                [owners[i][2] for i in idx],
            )

    def hazard(self, text: str) -> str:
        """Nearest AILuminate hazard description to `text` (zero-shot hint for harmful findings)."""
        with self._lock:
            if self._hazards is None:
                self._hazards = self.encoder.encode(list(HAZARDS.values()))
            vec = self.encoder.encode([text[:2000]])
            return list(HAZARDS)[int((vec @ self._hazards.T).argmax())]


_MODELS: dict[str, GuardModel] = {}
_MODELS_LOCK = threading.Lock()


def get_guard_model(head_dir: str | Path | None = None) -> GuardModel:
    """One shared model per head directory per process (the encoder is ~90 MB)."""
    key = str(Path(head_dir).resolve()) if head_dir is not None else str(default_head_dir())
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _MODELS[key] = GuardModel(head_dir)
        return model


class ClassifierScanner:
    """One category of the shared head, as a scanner."""

    def __init__(self, category: str, head_dir: str | None = None, hazard_hint: bool = True) -> None:
        if category not in HEAD_LABELS:
            raise ValueError(f"no classifier for category {category!r}")
        self.name: str = category
        self.category: Category = category
        self.head_dir = head_dir
        self.hazard_hint = hazard_hint

    @property
    def model(self) -> GuardModel:
        return get_guard_model(self.head_dir)

    def default_threshold(self) -> float:
        return self.model.thresholds.get(self.category, 0.5)

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        model = self.model
        if "guard" not in doc.cache:
            model.score_documents([doc])
        scores: WindowScores = doc.cache["guard"]
        if scores.probs.shape[0] == 0:
            return []
        col = scores.probs[:, model.labels.index(self.category)]
        best = int(col.argmax())
        score = float(col[best])
        span = scores.spans[best]
        where = "decoded text" if scores.decoded[best] else f"characters {span.start}-{span.end}"
        reason = f"{self.category.replace('_', ' ')} classifier p={score:.2f} on {where}"
        subtype = None
        if self.category == "harmful" and self.hazard_hint and score >= 0.5:
            subtype = model.hazard(doc.original[span.start : span.end])
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
