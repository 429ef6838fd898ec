"""Guard policies: data (YAML), validated by pydantic, versioned by the hash of their content.

A policy set names policies and binds them to (tenant, route) pairs; the most specific binding wins
(tenant+route, then tenant, then route, then `default`). Each policy lists input and output scanners
with a threshold and an action. Validation happens at load time against the scanner registry, so a
typo in a scanner name, an `entity_actions` key the scanner never reports, or a threshold of 1.5 is
an error when the gateway starts, never a silently unguarded request. The version is the SHA-256 of
the canonical JSON of the *validated* policy, so reformatting the YAML does not change it, and every
verdict names the exact policy it applied.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from steward.yaml_unique import DuplicateKeyError, safe_load_unique

from .base import Registry, default_registry
from .types import Action

__all__ = ["BUILTIN_POLICY", "Policy", "PolicyError", "PolicySet", "ScannerSpec", "load_policy_set"]

BUILTIN_POLICY = Path(__file__).parent / "policies" / "default.yaml"


class PolicyError(ValueError):
    """A policy file that cannot be used; the message says where and why."""


# Numbers and flags are read strictly: YAML's `true` is not the threshold 1.0 (which switches a
# scanner off), and the string "0.5" is not a number. An int is a number (1 -> 1.0, same hash).
StrictNumber = Annotated[float, Strict()]


# Scanners that read only one side of a request: listed on the other they would run on every
# request and never find anything, a check that silently is not there.
ONE_DIRECTION: dict[str, tuple[str, str]] = {
    "prompt_leak": ("output", "reads answers for the system prompt (its canary, its wording)"),
    "context_probe": ("input", "reads user turns against their system prompt"),
}


class ScannerSpec(BaseModel):
    """One scanner in a policy: which, how sure it must be, and what to do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scanner: str
    threshold: StrictNumber | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    action: Action = Action.BLOCK
    entity_actions: dict[str, Action] = Field(default_factory=dict)
    quasi_action: Action = Action.FLAG
    redaction: Literal["pseudonym", "mask", "hash"] = "pseudonym"
    fail_closed: StrictBool | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    input: list[ScannerSpec] = Field(default_factory=list)
    output: list[ScannerSpec] = Field(default_factory=list)
    fail_closed: StrictBool = True
    restore_pseudonyms: StrictBool = True
    documents: StrictBool = True  # scan retrieved documents (tool / document messages) for indirect injection

    def version(self) -> str:
        """SHA-256 of the canonical JSON of this validated policy."""
        return self._version

    @functools.cached_property
    def _version(self) -> str:
        # Computed once per (frozen) policy: every verdict carries it, and the JSON dump and hash
        # cost ~50 us a time.
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


BindingRoute = Literal["*", "chat", "completions", "embeddings", "moderations"]


class Binding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = "*"
    # The routes a request is scanned under (`ScanContext.route`), or "*". Anything else (a URL
    # path, a misspelling) would never match, and the tenant would silently get another policy.
    route: BindingRoute = "*"
    policy: str


class PolicySet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: StrictInt = 1
    policies: dict[str, Policy]
    bindings: list[Binding] = Field(default_factory=list)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"unsupported policy file version {v} (this Steward reads version 1)")
        return v

    @model_validator(mode="after")
    def _bindings_resolve(self) -> PolicySet:
        if "default" not in self.policies:
            raise ValueError("a policy set needs a policy named 'default'")
        for b in self.bindings:
            if b.policy not in self.policies:
                raise ValueError(f"binding {b.tenant}/{b.route} names unknown policy {b.policy!r}")
        return self

    def check_scanners(self, registry: Registry) -> None:
        """Every scanner named exists and accepts its options (constructed once, then dropped), and
        every `entity_actions` key is an entity that scanner, with those options, can report.
        Option values are checked against the types of the scanner's constructor first, so that
        `ngram: 2.5` is refused here rather than failing (closed) on every scan."""
        classes: dict[str, type | None] = {}
        for name, pol in self.policies.items():
            for direction, specs in (("input", pol.input), ("output", pol.output)):
                for i, spec in enumerate(specs):
                    where = f"policies.{name}.{direction}[{i}]"
                    if spec.scanner not in registry:
                        raise PolicyError(
                            f"{where}: unknown scanner {spec.scanner!r}; known: {', '.join(registry.names())}"
                        )
                    only = ONE_DIRECTION.get(spec.scanner)
                    if only is not None and only[0] != direction:
                        raise PolicyError(f"{where}: {spec.scanner} {only[1]}: list it under {only[0]}")
                    if spec.options:
                        if spec.scanner not in classes:
                            classes[spec.scanner] = _scanner_class(registry, spec.scanner)
                        cls = classes[spec.scanner]
                        if cls is not None:
                            _check_option_types(where, spec, cls)
                    try:
                        scanner = registry.create(spec.scanner, spec.options)
                    except (TypeError, ValueError) as exc:
                        raise PolicyError(f"{where}: bad options for {spec.scanner}: {exc}") from exc
                    if spec.options and classes.get(spec.scanner) is None:
                        _check_option_types(where, spec, type(scanner))
                    if spec.entity_actions:
                        _check_entity_actions(where, spec, registry, scanner)

    def select(self, tenant: str, route: str) -> tuple[str, Policy]:
        """The most specific binding: tenant+route > tenant > route > 'default'."""
        best: tuple[int, str] | None = None
        for b in self.bindings:
            t_ok = b.tenant in ("*", tenant)
            r_ok = b.route in ("*", route)
            if t_ok and r_ok:
                rank = (2 if b.tenant != "*" else 0) + (1 if b.route != "*" else 0)
                if best is None or rank > best[0]:
                    best = (rank, b.policy)
        name = best[1] if best else "default"
        return name, self.policies[name]


def _scanner_class(registry: Registry, name: str) -> type | None:
    """The class a registered scanner is built from (by building one with no options), or None
    when it cannot be built without options (its options are then checked after construction)."""
    try:
        return type(registry.create(name))
    except Exception:
        return None


@functools.lru_cache(maxsize=64)
def _option_hints(cls: type) -> dict[str, Any]:
    init = getattr(cls, "__init__", None)
    try:
        hints = typing.get_type_hints(init) if init is not None else {}
    except Exception:  # annotations that do not resolve: the values are not type-checked
        return {}
    hints.pop("return", None)
    return hints


@functools.lru_cache(maxsize=256)
def _adapter(hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def _check_option_types(where: str, spec: ScannerSpec, cls: type) -> None:
    """Each option whose constructor parameter is annotated gets a value of that type, strictly (no
    `true` for an int, no string for a number; an int is a float). Unknown option names are left to
    the constructor, which refuses them with a TypeError."""
    hints = _option_hints(cls)
    for key, value in spec.options.items():
        hint = hints.get(key)
        if hint is None or hint is Any:
            continue
        try:
            adapter = _adapter(hint)
        except Exception:  # an annotation pydantic cannot check (unhashable, arbitrary class)
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            at = "".join(f"[{p}]" for p in first["loc"] if isinstance(p, int))  # entities[1]
            raise PolicyError(
                f"{where}: bad options for {spec.scanner}: {key}{at}: {first['msg']} (got {value!r:.80})"
            ) from None


def _check_entity_actions(where: str, spec: ScannerSpec, registry: Registry, scanner: Any) -> None:
    """Each `entity_actions` key names an entity the spec's scanner reports. A scanner that declares
    no entity set is not checked (a third-party scanner registered without one)."""
    known = registry.entities(spec.scanner, scanner)
    if known is None:
        return
    for key in spec.entity_actions:
        if key in known:
            continue
        qualifier = ""
        if spec.options:  # a name the scanner reports only without these options
            try:
                everything = registry.entities(spec.scanner, registry.create(spec.scanner)) or frozenset()
            except (TypeError, ValueError):
                everything = frozenset()
            qualifier = " with its options" if key in everything else ""
        names = sorted(known)
        close = difflib.get_close_matches(key.upper(), names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise PolicyError(
            f"{where}: entity_actions key {key!r} is not an entity scanner {spec.scanner!r} reports"
            f"{qualifier}{hint}; it reports: {shown}"
        )


def _format_validation(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: invalid policy: " + "; ".join(parts)


def load_policy_set(
    source: str | Path | dict[str, Any] | None = None, registry: Registry | None = None
) -> PolicySet:
    """Load and validate a policy set from a YAML path, a dict, or the built-in default."""
    if source is None:
        source = BUILTIN_POLICY
    label = "policy" if isinstance(source, dict) else str(source)
    if isinstance(source, dict):
        data: Any = source
    else:
        path = Path(source)
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(
                f"{path}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            data = safe_load_unique(text)
        except DuplicateKeyError as exc:
            raise PolicyError(f"{path}:{exc.line}: duplicate key {exc.key!r}") from None
        except yaml.YAMLError as exc:
            raise PolicyError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{label}: a policy file must be a mapping")
    try:
        pset = PolicySet.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format_validation(exc, label)) from None
    try:
        pset.check_scanners(registry or default_registry())
    except PolicyError as exc:
        raise PolicyError(f"{label}: {exc}") from None
    return pset
