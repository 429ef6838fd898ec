"""The Transformer from the math: config, layers, encoder and decoder stacks, import, generation."""

from .config import ConfigError, TransformerConfig
from .embedding import SentenceEncoder
from .generate import Completion, Delta, GenerationConfig, GenerationError, stream
from .hf import from_hf
from .kv_cache import KVCache
from .transformer import Decoder, Encoder, InputError, build_model

__all__ = [
    "Completion",
    "ConfigError",
    "Decoder",
    "Delta",
    "Encoder",
    "GenerationConfig",
    "GenerationError",
    "InputError",
    "KVCache",
    "SentenceEncoder",
    "TransformerConfig",
    "build_model",
    "from_hf",
    "stream",
]
