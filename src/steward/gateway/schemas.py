"""Request models at the edge, following `../shared/data/openai/openapi.yaml`.

Known parameters are validated strictly (a string where a number belongs is a 400, not a coercion)
and integers are bounded (a 400, never a number the gateway cannot count with); parameters this file
does not know are kept (`extra="allow"`) so they pass through to upstreams that support them, and a
backend that does not answers 400 `unsupported_parameter` naming them. The embeddings request is the
exception: OpenAI's spec closes it, so an unknown field there is a 400 at the edge.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

Number = Annotated[float, Field(strict=False, allow_inf_nan=False)]

MAX_TOKENS = 2**31 - 1
"""The largest token count a request may ask for (an int32, what upstream servers' fields hold); a
larger one is a 400 naming the field, never a number the limiter cannot turn into a float."""
TokenCount = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)]
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


class _Edge(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        """The message's text; non-text parts are rejected by backends that cannot read them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: StrictBool | None = None


Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None


class _Sampling(_Edge):
    model: StrictStr = Field(min_length=1, max_length=256)
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stop: Stop = None
    seed: Int64 | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: TokenCount | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=64)]
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=20)] | None = None

    def token_budget(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# An embedding of nothing: OpenAI refuses it, and so does every backend here, in the schema.
_Text = Annotated[StrictStr, Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request takes exactly these fields (`additionalProperties: false` in the
    spec): anything else (`n`, `stream`, `stream_options`, ...) is a 400 naming it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: StrictStr = Field(min_length=1, max_length=256)
    input: _Text | Annotated[list[_Text], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- admin -------------------------------------------------------------------------------------------

Role = Literal["admin", "user", "auditor"]
Kind = Literal["requests", "tokens", "spend", "concurrent"]
Window = Literal["minute", "hour", "day", "month"]


class LimitSpec(BaseModel):
    """One limit, e.g. {"kind": "tokens", "window": "minute", "limit": 10000}."""

    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Kind
    window: Window | None = None
    limit: Annotated[Number, Field(ge=0)]

    @field_validator("window")
    @classmethod
    def _window(cls, v: Window | None, info: Any) -> Window | None:
        kind = info.data.get("kind")
        if kind == "concurrent" and v is not None:
            raise ValueError("a concurrent limit has no window")
        if kind != "concurrent" and v is None:
            raise ValueError(f"a {kind} limit needs a window (minute, hour, day or month)")
        return v


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tenant: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role = "user"
    name: Annotated[StrictStr, Field(max_length=128)] | None = None
    models: list[StrictStr] | None = None
    expires_in_s: Annotated[StrictInt, Field(ge=1)] | None = None
    limits: list[LimitSpec] = Field(default_factory=list)


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    limits: list[LimitSpec] | None = None
    policy: Annotated[StrictStr, Field(max_length=128)] | None = None
