"""Byte-level BPE (the `tokenizers` library) with Steward's chat template.

Byte-level BPE never meets an unknown character — any UTF-8 input, broken or not, maps to bytes — which
is what a model in front of arbitrary users needs. The project trains its own vocabulary (see
`train_bpe`) and saves it beside the weights as `tokenizer.json`; imported Hugging Face models bring
theirs (GPT-2's BPE, BERT's WordPiece), loaded through the same wrapper.
"""

from __future__ import annotations

import json
import re
import threading
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


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece-style byte tokens


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
        self._plain: HFTokenizer | None = None  # a copy that reads special-token strings as text
        self._plain_lock = threading.Lock()
        self._bytes: dict[int, bytes] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Tokens of `text`, where a control-token string such as "<|end|>" IS that control token.

        For text Steward writes itself (a rendered template, training data). Text from users goes
        through `encode_text` or `encode_chat`, so nobody can forge a turn or an end of text.
        """
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_text(self, text: str) -> list[int]:
        """Tokens of `text` as plain text: "<|endoftext|>" in it is 13 characters, not end-of-text.

        The same ids as `encode` for any text that spells no special token.
        """
        return list(self._plain_tokenizer().encode(text, add_special_tokens=False).ids)

    def _plain_tokenizer(self) -> HFTokenizer:
        # A copy of the tokenizer with special-token matching off: the flag is per tokenizer, and
        # flipping it on the shared one would race with other threads that encode templates.
        with self._plain_lock:
            if self._plain is None:
                plain = HFTokenizer.from_str(self.inner.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """The prompt ids of `apply_chat_template(messages)`, with control tokens only where the
        template puts them: message contents are tokenised as plain text (`encode_text`).

        For ordinary contents this equals `encode(apply_chat_template(messages))`: the tokenizer
        splits text at special tokens before anything else, so each piece is encoded on its own.
        """
        if not self.has_chat_template:
            raise TokenizerError("this tokenizer has no chat template (no <|user|>/<|assistant|>/<|end|>)")
        end = self._control(END)
        newline = self.encode_text("\n")
        ids: list[int] = []
        for role_token, content in self._turns(messages):
            ids.append(self._control(role_token))
            ids += self.encode_text("\n" + content)
            ids.append(end)
            ids += newline
        if add_generation_prompt:
            ids.append(self._control(ASSISTANT))
            ids += newline
        return ids

    def _control(self, token: str) -> int:
        idx = self.inner.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"this tokenizer has no {token} token")
        return int(idx)

    def token_bytes(self, idx: int) -> bytes:
        """The bytes a single token stands for, even when they are only part of a UTF-8 character
        (where `decode([idx])` shows U+FFFD). A special token's bytes are its text."""
        raw = self._bytes.get(idx)
        if raw is None:
            raw = self._bytes[idx] = self._token_bytes(idx)
        return raw

    def _token_bytes(self, idx: int) -> bytes:
        token = self.inner.id_to_token(idx)
        if token is None:
            return b""
        added = self.inner.get_added_tokens_decoder().get(idx)
        if added is not None:
            return str(added.content).encode("utf-8")
        if isinstance(self.inner.decoder, decoders.ByteLevel) and all(c in _BYTE_DECODER for c in token):
            return bytes(_BYTE_DECODER[c] for c in token)
        m = _BYTE_FALLBACK.fullmatch(token)
        if m is not None:
            return bytes([int(m.group(1), 16)])
        return self.decode([idx], skip_special_tokens=False).encode("utf-8")

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
        """Render OpenAI-style messages into the prompt text the built-in model was trained on.

        A string, for training and display: tokenising it with `encode` reads any control-token
        string inside a content as that token. Prompts from users are built with `encode_chat`.
        """
        parts = [f"{role_token}\n{content}{END}\n" for role_token, content in self._turns(messages)]
        if add_generation_prompt:
            parts.append(f"{ASSISTANT}\n")
        return "".join(parts)

    @staticmethod
    def _turns(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
        turns: list[tuple[str, str]] = []
        for i, msg in enumerate(messages):
            role = msg.get("role")
            content = msg.get("content")
            if role not in ROLE_TOKENS:
                raise TokenizerError(f"messages[{i}].role must be system, user or assistant")
            if not isinstance(content, str):
                raise TokenizerError(f"messages[{i}].content must be a string")
            turns.append((ROLE_TOKENS[role], content))
        return turns

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
