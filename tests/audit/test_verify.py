"""`audit verify` against every kind of tampering, on SQLite and PostgreSQL, plus concurrent writers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

from steward.audit import merkle
from steward.audit.events import canonical_json
from steward.audit.log import AuditLog, node_id
from steward.audit.note import PUBLIC_NAME, Signer, Verifier, load_verifier
from steward.audit.schema import CHECKPOINTS, DATA_KEYS, EVENTS, NODES
from steward.audit.verify import verify_store

from .helpers import make_event

N = 40  # checkpoints at 10, 20, 30, 40


@pytest.fixture
def filled(log: AuditLog) -> AuditLog:
    for b in range(4):
        log.append_many(
            [make_event(10 * b + i, subject="carol" if 10 * b + i == 13 else None) for i in range(10)]
        )
    assert log.latest_checkpoint() is not None
    return log


def _verify(log: AuditLog, keys_dir: Path, **kw: bool) -> tuple[bool, int | None, str]:
    r = verify_store(log.engine, load_verifier(keys_dir / PUBLIC_NAME), **kw)
    first = r.first_bad
    return r.ok, (first.index if first else None), "\n".join(map(str, r.problems))


def _row(conn: Connection, idx: int) -> dict[str, object]:
    return dict(conn.execute(select(EVENTS).where(EVENTS.c.idx == idx)).mappings().one())


def _rewrite_leaf(
    conn: Connection, idx: int, change: Callable[[dict[str, object]], None], rehash: bool
) -> None:
    leaf = bytes(_row(conn, idx)["leaf"])  # type: ignore[arg-type]
    cut = leaf.index(b"\n")
    meta = json.loads(leaf[:cut])
    change(meta)
    new = canonical_json(meta) + leaf[cut:]
    values: dict[str, object] = {"leaf": new}
    if rehash:
        values["leaf_hash"] = merkle.leaf_hash(new)
    conn.execute(update(EVENTS).where(EVENTS.c.idx == idx).values(**values))


def t_modify_column(c: Connection) -> None:
    c.execute(update(EVENTS).where(EVENTS.c.idx == 13).values(outcome="ok-forged"))


def t_modify_leaf(c: Connection) -> None:
    _rewrite_leaf(c, 13, lambda m: m.update(outcome="forged"), rehash=False)


def t_modify_leaf_and_hash(c: Connection) -> None:
    # The careful forger: content, hash and the usage column all consistent; only roots can tell.
    _rewrite_leaf(c, 13, lambda m: m["usage"].update(prompt_tokens=0), rehash=True)  # type: ignore[attr-defined]


def t_delete_middle(c: Connection) -> None:
    c.execute(delete(EVENTS).where(EVENTS.c.idx == 13))


def t_delete_last(c: Connection) -> None:
    c.execute(delete(EVENTS).where(EVENTS.c.idx == N - 1))


def t_reorder(c: Connection) -> None:
    c.execute(update(EVENTS).where(EVENTS.c.idx == 13).values(idx=-1))
    c.execute(update(EVENTS).where(EVENTS.c.idx == 14).values(idx=13))
    c.execute(update(EVENTS).where(EVENTS.c.idx == -1).values(idx=14))


def t_insert_middle(c: Connection) -> None:
    row = _row(c, 12)
    for i in range(N - 1, 12, -1):
        c.execute(update(EVENTS).where(EVENTS.c.idx == i).values(idx=i + 1))
    row.update(idx=13, event_id="f" * 32, request_id="forged")
    c.execute(insert(EVENTS).values(**row))


def t_insert_end(c: Connection) -> None:
    row = _row(c, N - 1)
    leaf = bytes(row["leaf"])  # type: ignore[arg-type]
    cut = leaf.index(b"\n")
    meta = json.loads(leaf[:cut])
    meta.update(idx=N, id="e" * 32)
    new = canonical_json(meta) + leaf[cut:]
    row.update(idx=N, event_id="e" * 32, leaf=new, leaf_hash=merkle.leaf_hash(new))
    c.execute(insert(EVENTS).values(**row))


def t_delete_data_key(c: Connection) -> None:
    leaf = bytes(_row(c, 13)["leaf"])  # type: ignore[arg-type]
    key = json.loads(leaf[: leaf.index(b"\n")])["payload"]["key"]
    c.execute(delete(DATA_KEYS).where(DATA_KEYS.c.id == key))


# tamper -> the event the verifier must name first
TAMPERS: dict[str, tuple[Callable[[Connection], None], int]] = {
    "modify_column": (t_modify_column, 13),
    "modify_leaf": (t_modify_leaf, 13),
    "delete_middle": (t_delete_middle, 13),
    "delete_last": (t_delete_last, N - 1),
    "reorder": (t_reorder, 13),
    "insert_middle": (t_insert_middle, 13),
    "insert_end": (t_insert_end, N),
    "delete_data_key": (t_delete_data_key, 13),
}


def test_clean_log_verifies(filled: AuditLog, keys_dir: Path) -> None:
    assert _verify(filled, keys_dir) == (True, None, "")


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tamper_is_detected_and_named(filled: AuditLog, keys_dir: Path, name: str) -> None:
    tamper, bad = TAMPERS[name]
    with filled.engine.begin() as conn:
        tamper(conn)
    ok, first, text = _verify(filled, keys_dir, allow_unsigned_tail=True)
    assert not ok
    assert first == bad, text


def test_consistent_forgery_is_caught_by_the_checkpoint_root(filled: AuditLog, keys_dir: Path) -> None:
    with filled.engine.begin() as conn:
        t_modify_leaf_and_hash(conn)
    ok, first, text = _verify(filled, keys_dir)
    assert not ok and first is not None and 10 <= first <= 13, text
    assert "signed checkpoint of size 20" in text
    # Even with the node cache rewritten to match, the signed root still catches it.
    with filled.engine.begin() as conn:
        hashes = [bytes(h) for (h,) in conn.execute(select(EVENTS.c.leaf_hash).order_by(EVENTS.c.idx))]
        tree = merkle.MemoryTree()
        for h in hashes:
            tree.append(h)
        conn.execute(update(NODES).where(NODES.c.id == node_id(4, 0)).values(hash=tree.node(4, 0)))
        conn.execute(update(NODES).where(NODES.c.id == node_id(5, 0)).values(hash=tree.node(5, 0)))
    ok, first, text = _verify(filled, keys_dir)
    assert not ok and first == 10 and "signed checkpoint of size 20" in text, text


def test_checkpoint_tampering(filled: AuditLog, keys_dir: Path) -> None:
    with filled.engine.begin() as conn:
        note = conn.execute(select(CHECKPOINTS.c.note).where(CHECKPOINTS.c.size == 20)).scalar_one()
        conn.execute(
            update(CHECKPOINTS).where(CHECKPOINTS.c.size == 20).values(note=note.replace("\n20\n", "\n21\n"))
        )
    ok, _, text = _verify(filled, keys_dir)
    assert not ok and "checkpoint at size 20" in text
    with filled.engine.begin() as conn:
        conn.execute(
            update(CHECKPOINTS).where(CHECKPOINTS.c.size == 20).values(note=note, root_hash=b"\x00" * 32)
        )
    ok, _, text = _verify(filled, keys_dir)
    assert not ok and "does not match its signed note" in text


def test_node_cache_tampering(filled: AuditLog, keys_dir: Path) -> None:
    with filled.engine.begin() as conn:
        conn.execute(update(NODES).where(NODES.c.id == node_id(4, 1)).values(hash=b"\x01" * 32))
    ok, first, text = _verify(filled, keys_dir)
    assert not ok and first == 16 and "cached Merkle node" in text


def test_wrong_public_key_fails(filled: AuditLog) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Signer(filled.origin or "x", Ed25519PrivateKey.generate()).verifier
    r = verify_store(filled.engine, Verifier.parse(other.vkey()))
    assert not r.ok and "no signature by this public key" in str(r.problems[0])


def test_unsigned_tail(filled: AuditLog, keys_dir: Path) -> None:
    filled.append_many([make_event(100 + i) for i in range(3)])
    ok, first, text = _verify(filled, keys_dir)
    assert not ok and first == N and "unsigned" in text
    assert _verify(filled, keys_dir, allow_unsigned_tail=True)[0]
    r = verify_store(filled.engine, load_verifier(keys_dir / PUBLIC_NAME), allow_unsigned_tail=True)
    assert (r.size, r.signed_size, r.unsigned) == (N + 3, N, 3)


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from steward.audit.log import AuditLog, GroupCommitter
    from steward.store.db import make_engine
    sys.path.insert(0, sys.argv[4])
    from helpers import make_event
    log = AuditLog.open(make_engine(sys.argv[1]), Path(sys.argv[2]), checkpoint_every=25)
    base = int(sys.argv[3])
    c = GroupCommitter(log, max_batch=7)
    futs = [c.submit(make_event(base + i)) for i in range(60)]
    print(sorted(f.result().index for f in futs))
    c.close()
    log.close()
    """
)


def test_two_processes_never_fork_the_log(engine: Engine, keys_dir: Path) -> None:
    AuditLog.open(engine, keys_dir).append(make_event(0))  # keys created once, as at server start
    url = engine.url.render_as_string(hide_password=False)
    here = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(keys_dir), str(base), here],
            stdout=subprocess.PIPE,
            text=True,
        )
        for base in (1000, 2000)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    got = sorted(i for out in outs for i in json.loads(out))
    assert got == list(range(1, 121))
    r = verify_store(engine, load_verifier(keys_dir / PUBLIC_NAME))
    assert r.ok and r.size == 121 and r.signed_size == 121, r.problems
