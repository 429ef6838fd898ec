"""Byte-level BPE (the `tokenizers` library) with Steward's chat template.

Byte-level BPE never meets an unknown character — any UTF-8 input, broken or not, maps to bytes — which
is what a model in front of arbitrary users needs. The project trains its own vocabulary (see
`train_bpe`) and saves it beside the weights as `tokenizer.json`; imported Hugging Face models bring
theirs (GPT-2's BPE, BERT's WordPiece), loaded through the same wrapper.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [EOS, PAD, SYSTEM, USER, ASSISTANT, END]

# The chat template, as a plain format rather than Jinja, so it is exact and cheap:
#   <|system|>\n{content}<|end|>\n<|user|>\n{content}<|end|>\n<|assistant|>\n{answer}<|endoftext|>
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """A thin, typed wrapper over a `tokenizers.Tokenizer` plus the special ids Steward needs."""

    def __init__(self, inner: HFTokenizer, *, eos_token: str | None = EOS) -> None:
        self.inner = inner
        self.eos_token = eos_token if eos_token and inner.token_to_id(eos_token) is not None else None
        self.eos_id: int | None = inner.token_to_id(self.eos_token) if self.eos_token else None
        pads = [inner.token_to_id(t) for t in (PAD, "[PAD]", "<pad>")]
        pad = next((p for p in pads if p is not None), None)
        self.pad_id: int = pad if pad is not None else (self.eos_id or 0)
        self.has_chat_template = all(inner.token_to_id(t) is not None for t in (USER, ASSISTANT, END))

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.inner.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.inner.id_to_token(idx)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render OpenAI-style messages into the prompt text the built-in model was trained on."""
        parts: list[str] = []
        for i, msg in enumerate(messages):
            role = msg.get("role")
            content = msg.get("content")
            if role not in ROLE_TOKENS:
                raise TokenizerError(f"messages[{i}].role must be system, user or assistant")
            if not isinstance(content, str):
                raise TokenizerError(f"messages[{i}].content must be a string")
            parts.append(f"{ROLE_TOKENS[role]}\n{content}{END}\n")
        if add_generation_prompt:
            parts.append(f"{ASSISTANT}\n")
        return "".join(parts)

    def save(self, directory: str | Path) -> None:
        self.inner.save(str(Path(directory) / "tokenizer.json"))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        try:
            inner = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(inner, eos_token=_guess_eos(Path(path).parent, inner))

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer | None:
        """The tokenizer saved in a model directory, or None when the directory has none."""
        path = Path(directory) / "tokenizer.json"
        return cls.from_file(path) if path.is_file() else None


def _guess_eos(directory: Path, inner: HFTokenizer) -> str | None:
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tok = json.loads(cfg.read_text()).get("eos_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str) and inner.token_to_id(tok) is not None:
                return tok
        except (json.JSONDecodeError, OSError):
            pass
    for cand in (EOS, "</s>", "[SEP]"):
        if inner.token_to_id(cand) is not None:
            return cand
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE vocabulary with Steward's special tokens at ids 0..5."""
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(inner)
