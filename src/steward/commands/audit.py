"""`steward audit ...`: verify the log, erase a data subject, export with proofs, sign a checkpoint.

Every command works on the store named by `--db` / `STEWARD_DATABASE_URL` (default: SQLite in
`$STEWARD_DATA_DIR`) and the keys in `$STEWARD_DATA_DIR/keys`. Failures are raised as ValueError or
RuntimeError subclasses, which `steward.cli.main` prints as one line with a non-zero exit; a failed
verification prints its findings and exits 1.

The commands that act on the log (`erase`, `export`, `checkpoint`) append an admin event of their own
(role "cli", the OS user in `detail.os_user`) that the checkpoint they sign covers: an erasure is on
the record of the log it protects. The read-only commands (`verify`, `proof`, `consistency`) append
nothing; `verify` must not change what it checks, so they open the store as it is: a store that does
not exist, or that Steward has not migrated to this version, is an error, never created or migrated.
They also take no append lock and record no key identity (`AuditLog.open(read_only=True)`): an
auditor's proof does not write to the store or wait for (or hold up) the gateway's appends.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from steward.audit.log import AuditLog
    from steward.audit.note import Verifier

DB_HELP = "database URL (default: STEWARD_DATABASE_URL, else SQLite in $STEWARD_DATA_DIR)"


def _engine(db: str | None) -> Engine:
    from steward.store.db import make_engine
    from steward.store.migrate import upgrade

    return upgrade(make_engine(db))


def _existing_engine(db: str | None) -> Engine:
    """The store as it is, for the read-only commands: never created, never migrated. A SQLite
    file that does not exist (a typo in `--db`, a fresh data directory) or a database Steward has
    not migrated is an error, not an empty log that verifies."""
    from sqlalchemy.exc import SQLAlchemyError

    from steward.store.db import StoreError, _normalise, database_url, make_engine

    u = _normalise(database_url(db))
    shown = u.render_as_string(hide_password=True)
    if u.get_backend_name() == "sqlite":
        path = u.database
        if not path or path == ":memory:":
            raise StoreError("no audit store in an in-memory SQLite database")
        if not Path(path).is_file():
            raise StoreError(f"no audit store at {path} (check --db, STEWARD_DATABASE_URL, STEWARD_DATA_DIR)")
    engine = make_engine(u.render_as_string(hide_password=False))
    try:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        from steward.store.db import reading
        from steward.store.migrate import alembic_config

        with reading(engine).connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StoreError(f"cannot open the store at {shown}: {' '.join(str(exc).split())}") from None
    if current is None:
        engine.dispose()
        raise StoreError(f"no audit store at {shown} (the database holds no Steward tables)")
    if current != head:
        engine.dispose()
        raise StoreError(
            f"the store at {shown} is at schema revision {current}, not {head}; this command does "
            "not migrate it (any command that writes, e.g. `steward keys list`, does)"
        )
    return engine


def _keys_dir() -> Path:
    from steward.store.db import data_dir

    return data_dir() / "keys"


def _open_log(db: str | None, *, read_only: bool = False) -> AuditLog:
    from steward.audit.log import AuditLog

    engine = _existing_engine(db) if read_only else _engine(db)
    # read_only: no append lock, no key identity recorded, nothing created (see AuditLog.open)
    return AuditLog.open(engine, _keys_dir(), create_signing_key=False, read_only=read_only)


def _verifier(public_key: Path | None) -> Verifier:
    from steward.audit.note import PUBLIC_NAME, load_verifier

    return load_verifier(public_key if public_key is not None else _keys_dir() / PUBLIC_NAME)


def _parse_since(value: str) -> datetime:
    """An aware time in UTC; a bad or unrepresentable value is one line naming --since."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: {value!r} is not an ISO 8601 date or time") from None
    try:
        return t.astimezone(UTC) if t.tzinfo is not None else t.replace(tzinfo=UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError(f"--since: {value!r} is out of range") from None


MAX_SUBJECT_CHARS = 256  # the request's `user` field, which is what names a data subject


def _check_out(out: Path) -> None:
    """An export target that can be written: a file name in an existing directory, not a directory.
    Checked before the export is recorded, so a refused one leaves no record and no file."""
    if not out.name or out.is_dir():
        raise ValueError(f"--out: {out} is a directory; give a file to write")
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"--out: directory not found: {parent}")


def register(app: typer.Typer) -> None:
    audit = typer.Typer(help="Tamper-evident audit log: verify, erase, export.", no_args_is_help=True)
    app.add_typer(audit, name="audit")

    @audit.command("verify")
    def verify_command(
        allow_unsigned_tail: bool = typer.Option(
            False, "--allow-unsigned-tail", help="do not fail on events after the last checkpoint"
        ),
        public_key: Path | None = typer.Option(None, "--public-key", help="checkpoint public key file"),
        db: str | None = typer.Option(None, "--db", help=DB_HELP),
    ) -> None:
        """Rebuild the Merkle tree from the store and check it against every signed checkpoint."""
        from steward.audit.verify import verify_store

        engine = _existing_engine(db)
        try:
            verifier = _verifier(public_key)
            report = verify_store(engine, verifier, allow_unsigned_tail=allow_unsigned_tail)
        finally:
            engine.dispose()
        typer.echo(
            f"events={report.size} checkpoints={report.checkpoints} signed={report.signed_size} "
            f"unsigned={report.unsigned}"
        )
        if report.ok:
            typer.echo("audit log verified")
            return
        first = report.first_bad
        typer.echo(f"FAILED: {first}", err=True)
        for p in report.problems[:20]:
            if p is not first:
                typer.echo(f"  also: {p}", err=True)
        raise typer.Exit(1)

    @audit.command("erase")
    def erase_command(
        subject: str = typer.Option(..., "--subject", help="data subject id (the request's `user`)"),
        tenant: str | None = typer.Option(None, "--tenant", help="only in this tenant (default: all)"),
        db: str | None = typer.Option(None, "--db", help=DB_HELP),
    ) -> None:
        """Crypto-shred a data subject: destroy their data keys; leaves and verification are unaffected.

        The erasure is recorded in the log (one event per tenant that lost keys, naming the subject
        by its pseudonym), and the destroyed keys' bytes are scrubbed from the store's files; a
        scrub that could not finish (SQLite readers kept the write-ahead log busy) is one warning.
        """
        from steward.audit.log import os_user

        if not subject:
            raise ValueError("--subject must not be empty")
        if len(subject) > MAX_SUBJECT_CHARS:
            raise ValueError(f"--subject must be at most {MAX_SUBJECT_CHARS} characters (a request's `user`)")
        log = _open_log(db)
        try:
            erasure = log.erase(subject, tenant, role="cli", detail={"os_user": os_user()})
        finally:
            log.close()  # signs a checkpoint covering the erasure's record
        typer.echo(f"destroyed {erasure.count} data key(s) of subject {subject!r}")
        if not erasure.scrub.complete:
            typer.echo(f"warning: {erasure.scrub.message}", err=True)

    @audit.command("export")
    def export_command(
        since: str = typer.Option(..., "--since", help="ISO 8601 time; events at or after it"),
        out: Path = typer.Option(..., "--out", help="JSONL file to write"),
        db: str | None = typer.Option(None, "--db", help=DB_HELP),
    ) -> None:
        """Export events with inclusion proofs and the signed checkpoint, for offline verification."""
        from steward.audit.events import format_time
        from steward.audit.export import export_events
        from steward.audit.log import os_user

        t = _parse_since(since)
        _check_out(out)
        log = _open_log(db)
        detail: dict[str, object] = {"os_user": os_user(), "since": format_time(t), "file": out.name[:100]}
        try:
            # Recorded first, so the checkpoint the export signs covers (and exports) its own record.
            log.record_act("log.export", role="cli", detail=detail, route="cli audit export")
            tmp = out.with_name(out.name + ".partial")
            try:
                with tmp.open("w", encoding="utf-8") as f:
                    summary = export_events(log, f, t)
                tmp.replace(out)  # a crashed export never leaves a plausible-looking file behind
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                with contextlib.suppress(Exception):
                    log.record_act(
                        "log.export",
                        role="cli",
                        outcome="error",
                        detail={**detail, "error": type(exc).__name__},
                        route="cli audit export",
                    )
                raise
        finally:
            log.close()
        last = f"#{summary.first}..#{summary.tree_size - 1}" if summary.events else "none"
        typer.echo(
            f"exported {summary.events} event(s) ({last}), checkpoint size {summary.tree_size}, to {out}"
        )

    @audit.command("verify-export")
    def verify_export_command(
        file: Path = typer.Argument(..., help="an export written by `steward audit export`"),
        public_key: Path = typer.Option(..., "--public-key", help="checkpoint public key file"),
    ) -> None:
        """Verify an export offline with only the export and the public key."""
        from steward.audit.export import verify_export
        from steward.audit.note import load_verifier

        summary = verify_export(file, load_verifier(public_key))
        span = f"#{summary.first}..#{summary.tree_size - 1}, none missing" if summary.events else "none"
        typer.echo(
            f"export verified: {summary.events} event(s) ({span}) in {summary.origin} "
            f"at size {summary.tree_size}"
        )

    @audit.command("checkpoint")
    def checkpoint_command(db: str | None = typer.Option(None, "--db", help=DB_HELP)) -> None:
        """Sign a checkpoint of the current tree now (it covers the event recording this act)."""
        from steward.audit.log import AuditError, os_user

        log = _open_log(db)
        if log.signer is None:
            raise AuditError("no checkpoint signing key loaded")
        log.record_act(
            "log.checkpoint", role="cli", detail={"os_user": os_user()}, route="cli audit checkpoint"
        )
        cp = log.checkpoint()
        log.close()
        if cp is None:
            latest = log.latest_checkpoint()
            typer.echo(f"no new events; latest checkpoint size {latest.size if latest else 0}")
        else:
            typer.echo(cp.note, nl=False)

    @audit.command("proof")
    def proof_command(
        event: str | None = typer.Option(None, "--event", help="event id"),
        index: int | None = typer.Option(None, "--index", min=0, help="leaf index"),
        tree_size: int | None = typer.Option(
            None, "--tree-size", min=1, help="default: the latest checkpoint"
        ),
        db: str | None = typer.Option(None, "--db", help=DB_HELP),
    ) -> None:
        """Print an inclusion proof (JSON) for one event against a signed checkpoint."""
        if (event is None) == (index is None):
            raise typer.BadParameter("give exactly one of --event or --index")
        log = _open_log(db, read_only=True)
        proof = (
            log.inclusion_proof_for(event, tree_size)
            if event is not None
            else log.inclusion_proof(index or 0, tree_size)
        )
        typer.echo(json.dumps(proof.to_json()))

    @audit.command("consistency")
    def consistency_command(
        first: int = typer.Option(..., "--first", min=1, help="older tree size"),
        second: int = typer.Option(..., "--second", min=1, help="newer tree size"),
        db: str | None = typer.Option(None, "--db", help=DB_HELP),
    ) -> None:
        """Print a consistency proof (JSON, base64 hashes) between two tree sizes."""
        import base64

        log = _open_log(db, read_only=True)
        hashes = log.consistency_proof(first, second)
        typer.echo(
            json.dumps(
                {"first": first, "second": second, "proof": [base64.b64encode(h).decode() for h in hashes]}
            )
        )
