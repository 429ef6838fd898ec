"""The `Backend` protocol: one interface for the built-in model, a local HF model and any upstream.

Requests and responses are OpenAI wire objects (plain dicts validated at the gateway's edge), not a
private vocabulary: an upstream's answer passes through with its `tool_calls`, `refusal` and other
fields intact, and the built-in backends produce exactly what an upstream would. The gateway reads
what it needs (text for the output guard, `usage` for limits) from those objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

JSON = dict[str, Any]

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "server_error",
    "upstream_error",
    "timeout_error",
]


class BackendError(Exception):
    """A failure to report to the client in OpenAI's error shape.

    `status` is the HTTP status the gateway answers with; `retryable` tells a fallback chain whether
    another backend may still succeed (an upstream 5xx/429/timeout), as opposed to a request the
    client must fix (400) which no other backend would accept either.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        type: ErrorType = "upstream_error",
        code: str | None = None,
        param: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway, the trace and the audit log say about a model."""

    id: str  # the name clients use
    backend: str  # "builtin" | "hf" | "openai"
    context_length: int | None = None  # None = unknown (upstream)
    weights_sha256: str | None = None  # manifest hash of the weights, when the gateway holds them
    owned_by: str = "steward"
    capabilities: frozenset[str] = frozenset({"chat", "completions"})


@dataclass
class Call:
    """One call to a backend: the validated request body plus what the gateway decided.

    `body` is the OpenAI request object with `model` already rewritten to the backend's own name for
    the model (`upstream_model`); `include_usage` is forced on for streams so limits settle exactly.
    """

    body: JSON
    upstream_model: str
    request_id: str
    timeout_s: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """Async interface every backend implements.

    `chat`/`completion` return an OpenAI `chat.completion` / `text_completion` object with `usage`.
    `chat_stream`/`completion_stream` yield `chat.completion.chunk` / `text_completion` chunk objects;
    the last chunk carries `usage` (and no choices), as with `stream_options.include_usage`.
    Errors are raised as `BackendError` before the first chunk when possible; a failure mid-stream
    raises `BackendError` from the iterator.
    """

    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def models(self) -> list[ModelInfo]: ...

    def count_prompt_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        """An upper-bound estimate of prompt tokens, used to reserve limits before the call."""
        ...

    async def chat(self, call: Call) -> JSON: ...

    def chat_stream(self, call: Call) -> AsyncIterator[JSON]: ...

    async def completion(self, call: Call) -> JSON: ...

    def completion_stream(self, call: Call) -> AsyncIterator[JSON]: ...

    async def embeddings(self, call: Call) -> JSON: ...
