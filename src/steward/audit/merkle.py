"""RFC 9162 Merkle tree hashing, proof generation and proof verification.

Everything here is pure: trees are described by hash sources (`NodeSource`), so the same proof code
serves the store (cached internal nodes plus leaf hashes, a handful of rows per proof), the verifier
and the exporter (whole levels in memory), and tests (a plain list of leaves).

Terminology: a *perfect subtree* `(level, index)` covers leaves `[index * 2**level, (index + 1) *
2**level)`; every range the RFC's recursive definitions touch decomposes into a few perfect subtrees
with decreasing sizes, and its hash is their right fold with `node_hash`. Proof generation therefore
reduces to "which perfect subtrees do I need", which is answered before any hash is read so a store can
fetch them in one query.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Subtree = tuple[int, int]  # (level, index)


class ProofError(ValueError):
    """A proof does not verify, or a proof was requested for sizes that make no sense."""


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the domain separation byte keeps leaves and nodes from colliding."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_pow2_below(n: int) -> int:
    """The largest power of two strictly less than n (n >= 2), the RFC's split point k."""
    return 1 << ((n - 1).bit_length() - 1)


def decompose(start: int, end: int) -> list[Subtree]:
    """Perfect subtrees covering [start, end), largest first, as MTH splits such a range.

    Only valid for the ranges produced by the RFC recursions (start is a multiple of a power of two at
    least as large as the range's largest part); asserted so a misuse fails loudly in tests.
    """
    out: list[Subtree] = []
    while start < end:
        size = end - start
        level = size.bit_length() - 1
        assert start % (1 << level) == 0, (start, end)
        out.append((level, start >> level))
        start += 1 << level
    return out


def fold(hashes: Sequence[bytes]) -> bytes:
    """Hash of a range from the hashes of its perfect subtrees, largest (leftmost) first."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_plan(index: int, size: int) -> list[list[Subtree]]:
    """Per RFC 9162 §2.1.3.1 PATH(m, D[n]): for each proof element (leaf side first) its subtrees."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    plan: list[list[Subtree]] = []
    lo, hi, m = 0, size, index
    # Walk from the root down, recording siblings; the proof lists them bottom-up, so reverse at the end.
    while hi - lo > 1:
        k = _largest_pow2_below(hi - lo)
        if m < k:
            plan.append(decompose(lo + k, hi))
            hi = lo + k
        else:
            plan.append(decompose(lo, lo + k))
            lo, m = lo + k, m - k
    plan.reverse()
    return plan


def consistency_plan(size1: int, size2: int) -> list[list[Subtree]]:
    """Per RFC 9162 §2.1.4.1 PROOF(m, D[n]) = SUBPROOF(m, D[n], true), as subtree lists."""
    if not 0 < size1 <= size2:
        raise ProofError(f"no consistency proof from size {size1} to size {size2}")
    plan: list[list[Subtree]] = []
    lo, hi, m, whole = 0, size2, size1, True
    while True:
        n = hi - lo
        if m == n:
            if not whole:
                plan.append(decompose(lo, hi))
            break
        k = _largest_pow2_below(n)
        if m <= k:
            plan.append(decompose(lo + k, hi))
            hi = lo + k
        else:
            plan.append(decompose(lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    plan.reverse()
    return plan


class NodeSource(Protocol):
    """Anything that can produce the hashes of perfect subtrees, many at once."""

    def subtree_hashes(self, subtrees: Iterable[Subtree]) -> Mapping[Subtree, bytes]: ...


def resolve(plan: list[list[Subtree]], source: NodeSource) -> list[bytes]:
    wanted = {s for part in plan for s in part}
    got = source.subtree_hashes(wanted)
    return [fold([got[s] for s in part]) for part in plan]


def inclusion_proof(index: int, size: int, source: NodeSource) -> list[bytes]:
    return resolve(inclusion_plan(index, size), source)


def consistency_proof(size1: int, size2: int, source: NodeSource) -> list[bytes]:
    return resolve(consistency_plan(size1, size2), source)


def root(size: int, source: NodeSource) -> bytes:
    if size == 0:
        return EMPTY_ROOT
    parts = decompose(0, size)
    got = source.subtree_hashes(parts)
    return fold([got[s] for s in parts])


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) ---------------------------------------------------


def _check_hashes(proof: Sequence[bytes]) -> None:
    for i, p in enumerate(proof):
        if len(p) != HASH_SIZE:
            raise ProofError(f"proof element {i} is {len(p)} bytes, not {HASH_SIZE}")


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof; raises ProofError when the proof's shape is wrong."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    if len(leaf) != HASH_SIZE:
        raise ProofError(f"leaf hash is {len(leaf)} bytes, not {HASH_SIZE}")
    _check_hashes(proof)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes) -> None:
    """Raise ProofError unless `leaf` is at `index` in the tree of `size` with `root_hash`."""
    if not _eq(root_from_inclusion(index, size, leaf, proof), root_hash):
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root of size {size}")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Raise ProofError unless the tree of size1/root1 is a prefix of the tree of size2/root2.

    Size 0 is refused: the RFC defines consistency proofs only for 0 < size1, and a "proof" that the
    empty tree is a prefix proves nothing.
    """
    if size2 < size1:
        raise ProofError(f"size2 ({size2}) is smaller than size1 ({size1})")
    if size1 == 0:
        raise ProofError("consistency from an empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("equal sizes need an empty consistency proof")
        if not _eq(root1, root2):
            raise ProofError(f"roots differ for the same size {size1}")
        return
    if not proof:
        raise ProofError("empty consistency proof for different sizes")
    _check_hashes(proof)
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: its root is a node of the larger tree
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if not _eq(fr, root1):
        raise ProofError(f"consistency proof does not reproduce the root of size {size1}")
    if not _eq(sr, root2):
        raise ProofError(f"consistency proof does not reproduce the root of size {size2}")


# --- in-memory trees --------------------------------------------------------------------------------


class CompactRange:
    """The right frontier of a growing tree: one perfect-subtree hash per set bit of the size.

    Appending is amortised O(1) hashes and the root is O(log n), which is what the store keeps in its
    sequencer row so any process can append without reading the tree. `on_node` sees every perfect
    node completed by an append, so callers can persist the ones they cache.
    """

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a compact range of size {size} needs {bin(size).count('1')} hashes")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes, on_node: Callable[[int, int, bytes], None] | None = None) -> None:
        h, level, index = leaf, 0, self.size
        while index & 1:
            h = node_hash(self.hashes.pop(), h)
            level += 1
            index >>= 1
            if on_node is not None:
                on_node(level, index, h)
        self.hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        return fold(self.hashes) if self.hashes else EMPTY_ROOT

    def pack(self) -> bytes:
        return b"".join(self.hashes)

    @classmethod
    def unpack(cls, size: int, blob: bytes) -> CompactRange:
        if len(blob) % HASH_SIZE:
            raise ValueError("compact range blob is not a whole number of hashes")
        return cls(size, [blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)])


class MemoryTree:
    """All perfect-subtree hashes of a tree, level by level, 32 bytes per node in flat bytearrays.

    About 64 MB at a million leaves; proofs then cost only the fold hashes. Used by the verifier (it
    rebuilds the whole tree anyway) and the exporter (thousands of proofs at once).
    """

    def __init__(self) -> None:
        self.levels: list[bytearray] = [bytearray()]
        self.size = 0

    def append(self, leaf: bytes) -> None:
        if len(leaf) != HASH_SIZE:
            raise ValueError("leaf hash must be 32 bytes")
        self.levels[0] += leaf
        index, level, h = self.size, 0, leaf
        while index & 1:
            lv = self.levels[level]
            h = node_hash(bytes(lv[-2 * HASH_SIZE : -HASH_SIZE]), h)
            level += 1
            index >>= 1
            if len(self.levels) == level:
                self.levels.append(bytearray())
            self.levels[level] += h
        self.size += 1

    def node(self, level: int, index: int) -> bytes:
        lv = self.levels[level]
        off = index * HASH_SIZE
        if off + HASH_SIZE > len(lv):
            raise KeyError((level, index))
        return bytes(lv[off : off + HASH_SIZE])

    def subtree_hashes(self, subtrees: Iterable[Subtree]) -> dict[Subtree, bytes]:
        return {s: self.node(*s) for s in subtrees}

    def root(self, size: int | None = None) -> bytes:
        return root(self.size if size is None else size, self)


@dataclass(frozen=True)
class LeafList:
    """A NodeSource over a plain list of leaf hashes; O(n) per query, for tests and small trees."""

    leaves: Sequence[bytes]

    def _hash(self, level: int, index: int) -> bytes:
        if level == 0:
            return self.leaves[index]
        return node_hash(self._hash(level - 1, 2 * index), self._hash(level - 1, 2 * index + 1))

    def subtree_hashes(self, subtrees: Iterable[Subtree]) -> dict[Subtree, bytes]:
        return {s: self._hash(*s) for s in subtrees}
