"""The one configuration object for both Transformer stacks.

A single dataclass covers the decoder (GPT-2 style: pre-LayerNorm, causal, tied LM head) and the
encoder (BERT style: post-LayerNorm, bidirectional, token-type embeddings, pooled output), because
the two differ only in a handful of switches; keeping them in one place makes checkpoint import a
pure mapping of names and values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Arch = Literal["decoder", "encoder"]
Activation = Literal["gelu", "gelu_tanh", "relu"]


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


@dataclass
class TransformerConfig:
    arch: Arch = "decoder"
    vocab_size: int = 8192
    max_positions: int = 256  # learned absolute positions, as in GPT-2 and BERT
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 1024
    activation: Activation = "gelu_tanh"
    norm_eps: float = 1e-5
    norm_first: bool = True  # pre-LN (GPT-2) when True, post-LN (BERT) when False
    embedding_norm: bool = False  # BERT normalises the embedding sum; GPT-2 does not
    final_norm: bool = True  # GPT-2's ln_f; BERT has none
    type_vocab_size: int = 0  # BERT token-type (segment) embeddings; 0 = absent
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    num_labels: int = 0  # encoder classification head; 0 = no head
    pooling: Literal["mean", "cls"] = "mean"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    name: str = "steward"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        if self.arch not in ("decoder", "encoder"):
            raise ConfigError(f"arch must be 'decoder' or 'encoder', got {self.arch!r}")
        for name in ("vocab_size", "max_positions", "d_model", "n_heads", "n_layers", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.activation not in ("gelu", "gelu_tanh", "relu"):
            raise ConfigError(f"unknown activation {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TransformerConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"model config not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"model config {path} must be a JSON object")
        return cls.from_dict(data)
