"""The Transformer from the math: config, layers, encoder and decoder stacks, import, generation."""

from .config import ConfigError, TransformerConfig
from .embedding import SentenceEncoder
from .hf import from_hf
from .kv_cache import KVCache
from .transformer import Decoder, Encoder, InputError, build_model

__all__ = [
    "ConfigError",
    "Decoder",
    "Encoder",
    "InputError",
    "KVCache",
    "SentenceEncoder",
    "TransformerConfig",
    "build_model",
    "from_hf",
]
