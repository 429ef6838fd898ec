"""Audit log throughput, verification speed and proof latency (issue 5, item 9).

Run:  python benchmarks/bench_audit.py [--leaves 1000000] [--append 50000] [--pg-url URL] [--json PATH]

Figures, and how each is defined:

* append/s (group commit): `--append` events, each with a ~300-byte encrypted payload, findings and
  usage, submitted by `--callers` threads to one `GroupCommitter`; the timed region runs from the
  first submit until every caller's future resolved, i.e. until every event is committed (SQLite WAL,
  synchronous=NORMAL, as the gateway runs it). Target >= 5,000/s on SQLite.
* fill/s: the log is then grown to `--leaves` with `append_many` in batches of 2,000 (same code path,
  no queueing), which is also how fast a backlog drains.
* verify: `verify_store` over the whole store: every leaf re-parsed, re-hashed, columns compared,
  tree rebuilt, every checkpoint signature and consecutive consistency proof, node cache compared.
  Target <= 60 s at 1M events.
* inclusion proof: `AuditLog.inclusion_proof(i)` for 2,000 random i against the latest checkpoint,
  each a fresh read from the store (checkpoint row, <= 20 cached nodes, <= 32 leaf hashes);
  median and p99 wall time. Target <= 5 ms at 1M leaves. Each proof is checked once for validity.

Everything runs in a temporary directory (keys included) that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from steward.audit import merkle
from steward.audit.events import AuditEvent, Finding, Principal
from steward.audit.log import AuditLog, GroupCommitter
from steward.audit.note import PUBLIC_NAME, load_verifier
from steward.audit.verify import verify_store
from steward.store.db import make_engine
from steward.store.migrate import upgrade


def event(i: int) -> AuditEvent:
    return AuditEvent(
        kind="inference",
        principal=Principal(tenant=f"t{i % 4}", key_id=f"k{i % 50}", role="user"),
        outcome="ok",
        status=200,
        request_id=f"req-{i}",
        route="/v1/chat/completions",
        model_id="steward-tiny",
        weights_hash="ab" * 32,
        policy_version="p1",
        findings=(Finding("pii", 0.91, "redact"),),
        usage={"prompt_tokens": 42, "completion_tokens": 17, "total_tokens": 59},
        latencies_ms={"total": 12.5, "guard_input": 0.8, "backend": 11.0},
        subject=f"user{i % 100}" if i % 2 else None,
        payload={"prompt": "Summarise the quarterly report for me. " * 4, "answer": "Revenue grew. " * 8},
    )


def bench(url: str | None, workdir: Path, leaves: int, append: int, callers: int) -> dict[str, Any]:
    engine = upgrade(make_engine(url or f"sqlite:///{workdir / 'audit.db'}"))
    keys = workdir / "keys"
    log = AuditLog.open(engine, keys, checkpoint_every=10_000, checkpoint_interval_s=5.0)
    out: dict[str, Any] = {"store": engine.dialect.name}

    committer = GroupCommitter(log, max_batch=2000, max_wait_s=0.005)
    per = append // callers
    events = [[event(c * per + i) for i in range(per)] for c in range(callers)]
    futures: list[Any] = []
    lock = threading.Lock()

    def caller(batch: list[AuditEvent]) -> None:
        mine = [committer.submit(e) for e in batch]
        with lock:
            futures.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(b,)) for b in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in futures:
        f.result()
    dt = time.perf_counter() - t0
    committer.close()
    n = per * callers
    out["append_group_commit_per_s"] = round(n / dt)
    print(f"[{out['store']}] group commit: {n} events by {callers} callers in {dt:.2f}s = {n / dt:,.0f}/s")

    t0 = time.perf_counter()
    i = n
    batch = 2000
    while i < leaves:
        k = min(batch, leaves - i)
        log.append_many([event(j) for j in range(i, i + k)])
        i += k
    log.checkpoint()
    dt = time.perf_counter() - t0
    if leaves > n:
        out["fill_per_s"] = round((leaves - n) / dt)
        print(f"[{out['store']}] append_many fill to {leaves:,}: {dt:.1f}s = {(leaves - n) / dt:,.0f}/s")

    verifier = load_verifier(keys / PUBLIC_NAME)
    t0 = time.perf_counter()
    report = verify_store(engine, verifier)
    dt = time.perf_counter() - t0
    if not report.ok:
        raise SystemExit(f"verification failed: {report.first_bad}")
    out["verify_s"] = round(dt, 2)
    out["verify_events"] = report.size
    print(f"[{out['store']}] verify {report.size:,} events, {report.checkpoints} checkpoints: {dt:.1f}s")

    rng = random.Random(0)
    size = report.size
    times = []
    for _ in range(2000):
        idx = rng.randrange(size)
        t0 = time.perf_counter()
        p = log.inclusion_proof(idx)
        times.append(time.perf_counter() - t0)
    cp = log.latest_checkpoint()
    assert cp is not None
    merkle.verify_inclusion(p.index, p.tree_size, p.leaf_hash, p.proof, cp.root)
    times.sort()
    out["proof_median_ms"] = round(statistics.median(times) * 1000, 3)
    out["proof_p99_ms"] = round(times[int(len(times) * 0.99)] * 1000, 3)
    print(
        f"[{out['store']}] inclusion proof at {size:,} leaves: median {out['proof_median_ms']} ms, "
        f"p99 {out['proof_p99_ms']} ms"
    )
    log.close()
    engine.dispose()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--leaves", type=int, default=1_000_000, help="tree size for verify and proofs")
    ap.add_argument("--append", type=int, default=50_000, help="events for the group-commit figure")
    ap.add_argument("--callers", type=int, default=8, help="threads submitting concurrently")
    ap.add_argument("--pg-url", default=None, help="also run on this (empty) PostgreSQL database")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--skip-sqlite", action="store_true", help="only the PostgreSQL run (with --pg-url)")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        if not args.skip_sqlite:
            results.append(bench(None, Path(tmp) / "sqlite", args.leaves, args.append, args.callers))
        if args.pg_url:
            results.append(bench(args.pg_url, Path(tmp) / "pg", args.leaves, args.append, args.callers))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
