"""`steward audit verify`: rebuild the tree from the store and hold it against the signed checkpoints.

Checks, in one pass over `audit_events` in index order:
- every index is present exactly once (a gap is a deleted row; the leaf's own `idx` catches reordering
  and insertion in the middle);
- every indexed column equals what the leaf says, and `leaf_hash` equals SHA-256(0x00 || leaf);
- every checkpoint: signature by the public key, columns equal to the note, root equal to the rebuilt
  tree at its size, and a consistency proof between successive checkpoints that verifies;
- the caches: `merkle_state` (size + compact range) and every `merkle_nodes` row are re-derived;
- every data key named by a leaf exists in `data_keys` (destroyed is fine: that is erasure).

A leaf rewritten together with its `leaf_hash` is only caught by a checkpoint root; the report then
names the first event of the span that checkpoint covers beyond the last good one, narrowed to the
16-leaf block whose cached node disagrees when the cache was left alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import Engine

from steward.audit import merkle
from steward.audit.events import EventError, StoredEvent
from steward.audit.log import CACHE_LEVEL, split_node_id
from steward.audit.merkle import CompactRange, MemoryTree, ProofError, decompose
from steward.audit.note import Checkpoint, NoteError, Verifier
from steward.audit.schema import CHECKPOINTS, DATA_KEYS, EVENTS, NODES, STATE
from steward.store.db import reading

_COLUMNS = ("idx", "event_id", "time_us", "tenant", "kind", "request_id", "subject_ref", "outcome", "status")


@dataclass(frozen=True)
class Problem:
    """One finding. `index` is the event it names; for a root or cache mismatch, which cannot say which
    leaf changed, `index`..`end - 1` is the span it narrows the change to (`exact` is False)."""

    index: int | None
    message: str
    end: int | None = None

    @property
    def exact(self) -> bool:
        return self.end is None

    def __str__(self) -> str:
        return self.message if self.index is None else f"event #{self.index}: {self.message}"


@dataclass
class VerifyReport:
    size: int = 0
    checkpoints: int = 0
    signed_size: int = 0
    problems: list[Problem] = field(default_factory=list)
    unsigned_tail_allowed: bool = False

    @property
    def unsigned(self) -> int:
        return max(0, self.size - self.signed_size)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> Problem | None:
        """The problem naming the earliest bad event.

        Row-level findings name their event exactly. Otherwise the earliest span (from a checkpoint
        root) is narrowed by every other span that overlaps it (from cached nodes).
        """
        exact = [p for p in self.problems if p.exact and p.index is not None]
        if exact:
            return min(exact, key=lambda p: p.index or 0)
        spans = sorted(
            ((p.index, p.end, p) for p in self.problems if p.index is not None and p.end is not None),
            key=lambda t: (t[0], t[1]),
        )
        if not spans:
            return self.problems[0] if self.problems else None
        lo, hi, first = spans[0]
        for a, b, _ in spans[1:]:
            if a < hi and b > lo:
                lo, hi = max(lo, a), min(hi, b)
        if (lo, hi) == (first.index, first.end):
            return first
        return Problem(lo, f"changed within #{lo}..#{hi - 1} ({first.message})", hi)

    def add(self, index: int | None, message: str, end: int | None = None) -> None:
        self.problems.append(Problem(index, message, end))


def verify_store(
    engine: Engine, verifier: Verifier, *, allow_unsigned_tail: bool = False, batch: int = 5000
) -> VerifyReport:
    report = VerifyReport(unsigned_tail_allowed=allow_unsigned_tail)
    checkpoints: list[Checkpoint] = []
    with reading(engine).connect() as conn:
        for size, root_hash, note in conn.execute(
            select(CHECKPOINTS.c.size, CHECKPOINTS.c.root_hash, CHECKPOINTS.c.note).order_by(
                CHECKPOINTS.c.size
            )
        ):
            try:
                cp = verifier.verify(note)
            except NoteError as exc:
                report.add(None, f"checkpoint at size {size}: {exc}")
                continue
            if cp.size != size or cp.root != bytes(root_hash):
                report.add(None, f"checkpoint at size {size}: row does not match its signed note")
                continue
            if verifier.name and cp.origin != verifier.name:
                report.add(None, f"checkpoint at size {size}: origin {cp.origin!r} is not this log's")
                continue
            checkpoints.append(cp)
    report.checkpoints = len(checkpoints)

    tree = MemoryTree()
    key_ids: dict[str, int] = {}
    cp_i = 0
    matched: list[Checkpoint] = []  # checkpoints whose root the rebuilt tree reproduces
    good_size = 0  # size of the last checkpoint whose root matched
    stop = False
    with reading(engine).connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch).execute(
            select(
                EVENTS.c.idx,
                EVENTS.c.event_id,
                EVENTS.c.time_us,
                EVENTS.c.tenant,
                EVENTS.c.kind,
                EVENTS.c.request_id,
                EVENTS.c.subject_ref,
                EVENTS.c.outcome,
                EVENTS.c.status,
                EVENTS.c.leaf,
                EVENTS.c.leaf_hash,
            ).order_by(EVENTS.c.idx)
        )
        for row in result:
            expected = tree.size
            idx = row[0]
            if idx != expected:
                report.add(expected, f"missing (deleted?); the store jumps to #{idx}")
                stop = True
                break
            leaf = bytes(row[9])
            h = merkle.leaf_hash(leaf)
            try:
                ev = StoredEvent.from_leaf(leaf, check=False)
                cols = ev.columns()
            except EventError as exc:
                report.add(idx, f"leaf does not parse ({exc})")
            else:
                if ev.index != idx:
                    report.add(idx, f"leaf says it is #{ev.index}: rows reordered or inserted")
                for name, value in zip(_COLUMNS, row[:9], strict=True):
                    if cols[name] != value:
                        report.add(idx, f"column {name} was modified (row {value!r}, leaf {cols[name]!r})")
                        break
                if ev.data_key is not None:
                    key_ids.setdefault(ev.data_key, idx)
            if bytes(row[10]) != h:
                report.add(idx, "leaf bytes do not match the stored leaf hash (leaf or hash modified)")
            tree.append(h)
            while cp_i < len(checkpoints) and checkpoints[cp_i].size == tree.size:
                cp = checkpoints[cp_i]
                if tree.root() == cp.root:
                    good_size = cp.size
                    matched.append(cp)
                else:
                    report.add(
                        good_size,
                        f"tree root differs from the signed checkpoint of size {cp.size}: "
                        f"an event in #{good_size}..#{cp.size - 1} was changed",
                        cp.size,
                    )
                cp_i += 1
    report.size = tree.size
    if not stop and cp_i < len(checkpoints):
        cp = checkpoints[-1]
        report.add(
            tree.size,
            f"missing: the checkpoint of size {cp.size} covers {cp.size - tree.size} more events "
            "than the store holds (deleted?)",
        )
    report.signed_size = checkpoints[-1].size if checkpoints else 0
    if stop:
        return report

    # Consistency between successive checkpoints, proved from the rebuilt tree: the signed heads must
    # describe one history. (A head the tree does not reproduce is already reported above.)
    for a, b in itertools.pairwise(matched):
        try:
            merkle.verify_consistency(
                a.size, b.size, merkle.consistency_proof(a.size, b.size, tree), a.root, b.root
            )
        except ProofError as exc:
            report.add(a.size, f"checkpoints {a.size} and {b.size} are not consistent ({exc})")

    if report.unsigned and not allow_unsigned_tail:
        report.add(
            report.signed_size,
            f"{report.unsigned} event(s) #{report.signed_size}..#{tree.size - 1} "
            "are after the last checkpoint (unsigned)",
        )

    with reading(engine).connect() as conn:
        state = conn.execute(select(STATE.c.size, STATE.c.frontier).where(STATE.c.id == 1)).first()
        if state is None:
            report.add(None, "merkle_state row is missing")
        else:
            compact = CompactRange(tree.size, [tree.node(*s) for s in decompose(0, tree.size)])
            if state[0] != tree.size:
                # Rows the sequencer never appended (forged inserts), or appended rows now gone.
                report.add(
                    min(state[0], tree.size),
                    f"the sequencer recorded {state[0]} events but the store holds {tree.size} "
                    "(rows inserted or deleted behind the log's back)",
                )
            elif bytes(state[1]) != compact.pack():
                report.add(None, "merkle_state's compact range does not match the events")
        expected_nodes = sum(tree.size >> lvl for lvl in range(CACHE_LEVEL, tree.size.bit_length() + 1))
        seen = 0
        for nid, h in conn.execution_options(stream_results=True, yield_per=batch).execute(
            select(NODES.c.id, NODES.c.hash).order_by(NODES.c.id)
        ):
            level, index = split_node_id(nid)
            seen += 1
            first = index << level
            try:
                want = tree.node(level, index) if level >= CACHE_LEVEL else None
            except (KeyError, IndexError):
                want = None
            if want is None:
                report.add(None, f"merkle_nodes holds a node ({level}, {index}) that the events do not have")
            elif bytes(h) != want:
                report.add(
                    first,
                    f"cached Merkle node over #{first}..#{first + (1 << level) - 1} does not "
                    "match the events (an event in that range or the cache was changed)",
                    first + (1 << level),
                )
        if seen != expected_nodes:
            report.add(None, f"merkle_nodes holds {seen} nodes, the events need {expected_nodes}")
        known = {r[0] for r in conn.execute(select(DATA_KEYS.c.id))}
        for key_id, idx in sorted(key_ids.items(), key=lambda kv: kv[1]):
            if key_id not in known:
                report.add(idx, f"its data key {key_id} is absent from data_keys (deleted row?)")
                break
    return report
