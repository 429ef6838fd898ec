"""RFC 9162 hashing and proofs: the shared transparency-dev vectors, and generation against a reference."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from steward.audit import merkle
from steward.audit.merkle import (
    CompactRange,
    LeafList,
    MemoryTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)

REPO = Path(__file__).resolve().parents[2]
VECTORS = (
    (
        Path(os.environ["STEWARD_SHARED_DATA"])
        if os.environ.get("STEWARD_SHARED_DATA")
        else REPO.parent / "shared" / "data"
    )
    / "merkle"
    / "testdata"
)


def _files(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).rglob("*.json")) if VECTORS.is_dir() else []


def _b64(s: str | None) -> bytes:
    return base64.b64decode(s or "")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(VECTORS)) for p in paths]


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


INCLUSION = _files("inclusion")
CONSISTENCY = _files("consistency")


def test_vectors_present(shared_data: Path) -> None:
    # The parametrised lists below are empty without ../shared/data; make that visible, not silent.
    assert len(INCLUSION) > 50 and len(CONSISTENCY) > 50


@pytest.mark.parametrize("path", INCLUSION, ids=_ids(INCLUSION))
def test_inclusion_vector(path: Path) -> None:
    v = _load(path)
    args = (v["leafIdx"], v["treeSize"], _b64(v["leafHash"]), [_b64(p) for p in v["proof"] or []])
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args, _b64(v["root"]))
    else:
        verify_inclusion(*args, _b64(v["root"]))


@pytest.mark.parametrize("path", CONSISTENCY, ids=_ids(CONSISTENCY))
def test_consistency_vector(path: Path) -> None:
    v = _load(path)
    args = (v["size1"], v["size2"], [_b64(p) for p in v["proof"] or []], _b64(v["root1"]), _b64(v["root2"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


# The RFC 6962 reference leaves from which the happy-path vectors were generated.
RFC_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    bytes(range(0x60, 0x70)),
]


def _ref_mth(leaves: list[bytes]) -> bytes:
    """MTH straight from the RFC's recursive definition."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_ref_mth(leaves[:k]), _ref_mth(leaves[k:]))


def test_happy_path_proofs_are_generated_exactly(shared_data: Path) -> None:
    hashes = [leaf_hash(x) for x in RFC_LEAVES]
    for path in INCLUSION:
        v = _load(path)
        if v["wantErr"] or "single-entry" in str(path):
            continue
        size = v["treeSize"]
        assert _b64(v["root"]) == _ref_mth(RFC_LEAVES[:size])
        got = inclusion_proof(v["leafIdx"], size, LeafList(hashes[:size]))
        assert got == [_b64(p) for p in v["proof"] or []], path
    for path in CONSISTENCY:
        v = _load(path)
        if v["wantErr"] or "additional" in str(path) or v["size1"] == v["size2"]:
            continue
        got = consistency_proof(v["size1"], v["size2"], LeafList(hashes[: v["size2"]]))
        assert got == [_b64(p) for p in v["proof"] or []], path


def test_generated_proofs_verify_for_all_small_trees() -> None:
    leaves = [f"leaf {i}".encode() for i in range(40)]
    hashes = [leaf_hash(x) for x in leaves]
    tree = MemoryTree()
    compact = CompactRange()
    roots = [merkle.EMPTY_ROOT]
    for h in hashes:
        tree.append(h)
        compact.append(h)
        roots.append(compact.root())
    for n in range(1, 41):
        assert roots[n] == _ref_mth(leaves[:n]) == tree.root(n)
        for m in range(n):
            proof = inclusion_proof(m, n, tree)
            verify_inclusion(m, n, hashes[m], proof, roots[n])
            with pytest.raises(ProofError):
                verify_inclusion(m, n, hashes[(m + 1) % 40], proof, roots[n])
        for m in range(1, n + 1):
            proof = consistency_proof(m, n, tree)
            verify_consistency(m, n, proof, roots[m], roots[n])
            if m < n:
                with pytest.raises(ProofError):
                    verify_consistency(m, n, proof, roots[m - 1] if m > 1 else roots[2], roots[n])


def test_compact_range_reports_completed_nodes_and_packs() -> None:
    seen: list[tuple[int, int]] = []
    c = CompactRange()
    for i in range(8):
        c.append(leaf_hash(bytes([i])), lambda lvl, idx, h: seen.append((lvl, idx)))
    assert seen == [(1, 0), (1, 1), (2, 0), (1, 2), (1, 3), (2, 1), (3, 0)]
    c2 = CompactRange.unpack(c.size, c.pack())
    assert c2.root() == c.root()
    with pytest.raises(ValueError):
        CompactRange(3, [b"x" * 32])
