"""Gateway settings: one validated object from environment variables and an optional YAML file.

Precedence: explicit arguments (the CLI) > environment (`STEWARD_*`) > YAML file (`STEWARD_CONFIG` or
`--config`) > defaults. A bad value stops the server with one line naming the field, before it binds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from steward.yaml_unique import DuplicateKeyError, safe_load_unique


class ConfigError(ValueError):
    """Invalid configuration; the message is one line naming the field and the problem."""


class ModelRoute(BaseModel):
    """One entry of the routing table: a model name clients use and the backend that serves it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    backend: Literal["builtin", "hf", "openai"]
    path: Path | None = None  # builtin / hf: model directory (builtin: default = the committed model)
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8001/v1
    api_key_env: str | None = None  # openai: env var holding the upstream key (never in the file)
    upstream_model: str | None = None  # openai: the upstream's name for the model (default = name)
    fallbacks: list[str] = Field(default_factory=list)  # other route names tried on retryable failure
    max_retries: int = Field(default=2, ge=0, le=10)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    price_per_1k_prompt: float = Field(default=0.0, ge=0)
    price_per_1k_completion: float = Field(default=0.0, ge=0)
    # The field a cap goes upstream in when the gateway caps a chat request that names none (a key or
    # tenant with a token or spend budget): "max_tokens" is what vLLM, llama.cpp, Ollama and most
    # OpenAI models read; OpenAI's reasoning models accept only "max_completion_tokens".
    chat_cap_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"

    @model_validator(mode="after")
    def _check(self) -> ModelRoute:
        if self.backend == "openai" and not self.base_url:
            raise ValueError(f"model {self.name!r}: backend 'openai' needs base_url")
        if self.base_url is not None:
            # The rule the openai backend applies when it starts, checked with the settings so that
            # a bad URL stops `steward serve` before it binds, as one line.
            url = self.base_url.strip()
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"model {self.name!r}: base_url must start with http:// or https://, got {url[:100]!r}"
                )
            try:
                host = urlsplit(url).hostname
            except ValueError as exc:
                raise ValueError(
                    f"model {self.name!r}: base_url {url[:100]!r} is not a URL ({exc})"
                ) from None
            if not host:
                raise ValueError(f"model {self.name!r}: base_url {url[:100]!r} has no host")
        if self.backend == "hf" and self.path is None:
            raise ValueError(f"model {self.name!r}: backend 'hf' needs path")
        return self


def _default_models() -> list[ModelRoute]:
    return [ModelRoute(name="builtin", backend="builtin")]


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = safe_load_unique(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {self.path}") from None
        except DuplicateKeyError as exc:
            raise ConfigError(f"config file {self.path}:{exc.line}: duplicate key {exc.key!r}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {self.path}: {' '.join(str(exc).split())}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {self.path} must hold a mapping at the top level")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEWARD_", extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    data_dir: Path = Path("steward-data")
    database_url: str | None = None
    redis_url: str | None = None
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False  # structured logs never carry prompt text unless this is set
    key_cache_ttl_s: float = Field(default=0.5, ge=0, le=1.0)  # revocation reaches every replica within 1 s
    default_max_tokens: int = Field(default=256, ge=1)
    max_batch: int = Field(default=8, ge=1, le=256)  # builtin: rows decoded together
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)  # builtin: how long a batch waits to fill
    torch_threads: int | None = Field(default=None, ge=1, le=256)
    models: list[ModelRoute] = Field(default_factory=_default_models)
    embedding_model: str = "all-minilm-l6-v2"  # served by the built-in MiniLM encoder; "" = none
    guards: bool = True  # input and output scanners on every request (steward.guard)
    guard_policies: Path | None = None  # YAML policy set; None = the built-in default policies
    audit: bool = True  # every request and admin act in the Merkle log (steward.audit)
    audit_checkpoint_every: int = Field(default=1000, ge=1)
    audit_checkpoint_interval_s: float = Field(default=10.0, gt=0)
    # Refusals before a key is known, recorded one by one per minute; the rest of the minute are
    # counted in one summary event (anybody can send 401s without limit; the log is append-only).
    audit_unauthenticated_per_minute: int | None = Field(default=120, ge=0)
    payload_retention_days: float = Field(default=30.0, gt=0)  # prompts/answers; metadata is kept

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelRoute]) -> list[ModelRoute]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names: {', '.join(dup)}")
        for m in v:
            for f in m.fallbacks:
                if f not in names or f == m.name:
                    raise ValueError(f"model {m.name!r}: fallback {f!r} is not another configured model")
        return v

    @field_validator("database_url", "redis_url")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("STEWARD_CONFIG")
        return init_settings, env_settings, _YamlSource(settings_cls, Path(path) if path else None)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'steward.db').resolve()}"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build and validate settings; raise `ConfigError` with one line on any problem."""
    if config is not None:
        os.environ["STEWARD_CONFIG"] = str(config)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"invalid setting {where}: {msg}{more}") from None
