"""Lone surrogates: broken Unicode that Python's `json` decodes from an escape like `"\\ud83d"` with
no pair, and that no UTF-8 encoder (orjson, the audit log, a socket) takes. Carried on, one ended a
client's stream with a 500 and cost the request its audit record. One place decides what happens
to them: written back as their escape inside JSON text, or replaced by U+FFFD in a value."""

from __future__ import annotations

import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """JSON text with every lone surrogate (which only a string can hold) written as its `\\u`
    escape: the text is UTF-8, parses back to the same value and encodes to the same bytes again."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) if _SURROGATE.search(text) else text


def scrub_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (keys too) replaced by U+FFFD: what any UTF-8
    decoder makes of broken Unicode."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, list):
        return [scrub_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {scrub_surrogates(k): scrub_surrogates(v) for k, v in value.items()}
    return value
