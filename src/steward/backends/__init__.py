"""Backends behind one protocol: `builtin` (steward.model), `hf` (local transformers), `openai` (upstream)."""

from steward.backends.base import Backend, BackendError, Call, ModelInfo

__all__ = ["Backend", "BackendError", "Call", "ModelInfo"]
