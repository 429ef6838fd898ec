"""Key files created by several workers at once: every worker starts, and all use the same key."""

from __future__ import annotations

import multiprocessing as mp
import stat
from pathlib import Path

from steward.audit.crypto import LocalKeyProvider
from steward.audit.keyfile import create_private_file
from steward.audit.note import load_or_create_signer

WORKERS = 6
ROUNDS = 15


def _start(keys_dir: str, barrier: object, out: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    try:
        kek = LocalKeyProvider(Path(keys_dir) / "audit-kek.json", create=True).current_kek_id
        signer = load_or_create_signer(Path(keys_dir))
        out.put(("ok", kek, signer.name))  # type: ignore[attr-defined]
    except Exception as exc:  # the parent reports it
        out.put(("error", f"{type(exc).__name__}: {exc}", ""))  # type: ignore[attr-defined]


def test_workers_creating_the_keys_at_once_all_start_with_the_same_keys(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for r in range(ROUNDS):
        keys_dir = tmp_path / f"round{r}" / "keys"
        keys_dir.mkdir(parents=True)
        barrier, out = ctx.Barrier(WORKERS), ctx.Queue()
        procs = [ctx.Process(target=_start, args=(str(keys_dir), barrier, out)) for _ in range(WORKERS)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        errors = [r for r in results if r[0] != "ok"]
        assert not errors, errors
        assert len({(kek, name) for _, kek, name in results}) == 1, results


def test_create_private_file_publishes_once_and_privately(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    assert create_private_file(path, b"first")
    assert not create_private_file(path, b"second")
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temporary file left behind
