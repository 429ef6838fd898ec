"""YAML that refuses a repeated key, for every configuration file Steward reads.

PyYAML keeps the last of two equal keys silently: `action: block` then `action: allow` in a policy
allowed, `guards: true` then `guards: false` in the serve config turned the guards off. Here only
on PyYAML, so that reading the settings does not import the guard package (and torch).
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "safe_load_unique"]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML file names the same key twice; `line` is 1-based."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key
        self.line = line


_MERGE_TAG = "tag:yaml.org,2002:merge"


def safe_load_unique(text: str) -> Any:
    """`yaml.safe_load`, refusing any mapping that repeats a key (PyYAML keeps the last silently,
    so `action: block, action: allow` allowed). Keys merged in with `<<: *anchor` may be
    overridden by the mapping's own keys, as YAML intends. The node graph is checked before
    anything is constructed (construction flattens merges in place), once per node, so an alias
    bomb costs no more here than in the constructor."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        seen: set[int] = set()
        stack: list[yaml.Node] = [root]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                keys: set[Any] = set()
                for key_node, value_node in node.value:
                    stack.append(value_node)
                    if key_node.tag == _MERGE_TAG:
                        continue
                    if not isinstance(key_node, yaml.ScalarNode):
                        continue  # a complex key: the constructor refuses it (unhashable)
                    key = loader.construct_object(key_node, deep=True)
                    if key in keys:
                        raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                    keys.add(key)
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
        return loader.construct_document(root)
    finally:
        loader.dispose()
