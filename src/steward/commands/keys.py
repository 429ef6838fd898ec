"""`steward keys create|list|revoke`: manage API keys on the store directly (server running or not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer


def _store() -> object:
    from steward.gateway.keys import KeyStore
    from steward.store import upgrade

    return KeyStore(upgrade())


def _event(action: str, tenant: str, target: str) -> Any:
    """The audit event of one CLI key act: an admin act like any other, by the OS user."""
    import getpass

    from steward.audit import AuditEvent, Principal

    return AuditEvent(
        kind="admin",
        principal=Principal(tenant=tenant, key_id=None, key_prefix=None, role="cli"),
        outcome="ok",
        route=f"cli keys {action.split('.')[-1]}",
        detail={"action": action, "target": target, "os_user": getpass.getuser()},
    )


@contextmanager
def _audit_log(store: object) -> Iterator[Any]:
    """The audit log, opened BEFORE the store is changed: a store reached without its audit keys (a
    second host, a wrong STEWARD_DATA_DIR) refuses the act here, with one line and nothing changed,
    instead of changing the store and then failing to record it."""
    from steward.audit import AuditLog
    from steward.gateway.keys import KeyStore
    from steward.store.db import data_dir

    assert isinstance(store, KeyStore)
    log = AuditLog.open(store.engine, data_dir() / "keys")
    try:
        yield log
    finally:
        log.close()


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# The admin API's bounds (`routes/admin.py` MAX_KEY_LIFETIME_S, `schemas.KeyCreate`), repeated here so
# that `steward keys` does not import the web app; tests/test_cli_config.py keeps them equal.
MAX_KEY_LIFETIME_S = 10 * 365 * 24 * 3600
MAX_NAME_CHARS = 128
MAX_MODEL_CHARS = 256  # a request's `model` is at most this long: a longer name could never match
MAX_KEY_MODELS = 256  # names in one key's allow-list


def _check_create(name: str | None, models: list[str] | None, expires_in: int | None) -> None:
    """Refuse what `POST /admin/keys` refuses, before the store is touched."""
    if expires_in is not None and expires_in < 1:
        raise ValueError("--expires-in must be a positive number of seconds")
    if expires_in is not None and expires_in > MAX_KEY_LIFETIME_S:
        raise ValueError(
            f"--expires-in must be at most {MAX_KEY_LIFETIME_S} (ten years); omit it for a key that "
            "does not expire"
        )
    if name is not None and len(name) > MAX_NAME_CHARS:
        raise ValueError(f"--name must be at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if models is not None and len(models) > MAX_KEY_MODELS:
        raise ValueError(f"--model may be given at most {MAX_KEY_MODELS} times, got {len(models)}")
    for m in models or ():
        if not m.strip():
            raise ValueError("--model must name a model; an empty name allows nothing")
        if len(m) > MAX_MODEL_CHARS:
            raise ValueError(f"--model must be at most {MAX_MODEL_CHARS} characters, got {len(m)}")


def register(app: typer.Typer) -> None:
    keys = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
    app.add_typer(keys, name="keys")

    @keys.command("create")
    def create(
        tenant: str = typer.Option(..., "--tenant", help="tenant id (created if absent)"),
        role: str = typer.Option("user", "--role", help="admin, user or auditor"),
        name: str | None = typer.Option(None, "--name", help="a label for people"),
        model: list[str] | None = typer.Option(None, "--model", help="allow only this model (repeatable)"),
        expires_in: int | None = typer.Option(None, "--expires-in", help="seconds until the key expires"),
    ) -> None:
        """Create a key and print it once on stdout (only its hash is stored)."""
        from steward.gateway.keys import KeyStore

        _check_create(name, model, expires_in)
        store = _store()
        assert isinstance(store, KeyStore)
        with _audit_log(store) as log:
            key, rec = store.create(tenant, role, name=name, models=model, expires_in_s=expires_in)
            try:
                log.append(_event("key.create", rec.tenant, rec.id))
            except Exception as exc:
                # The record cannot be written: the key must not outlive that. Its plaintext was
                # never shown, so revoking it leaves nothing anyone can use (the same undo as
                # `POST /admin/keys`).
                try:
                    store.revoke(rec.id)
                    undone = f"the new key {rec.id} was revoked and not printed"
                except Exception as undo_exc:
                    undone = (
                        f"revoking the new key {rec.id} failed too ({_why(undo_exc)}); it was not "
                        "printed, revoke it by hand"
                    )
                raise RuntimeError(
                    f"the audit log could not record the key ({_why(exc)}); {undone}"
                ) from None
            typer.echo(key)
        typer.echo(f"created {rec.id} ({rec.prefix}…) for tenant {rec.tenant}, role {rec.role}", err=True)

    @keys.command("list")
    def list_(tenant: str | None = typer.Option(None, "--tenant", help="only this tenant's keys")) -> None:
        """List keys as JSON lines (prefixes only, never the keys)."""
        from steward.audit.log import OPERATOR_TENANT
        from steward.gateway.keys import TENANT_RE, KeyStore

        if tenant is not None and not TENANT_RE.match(tenant):
            # As `GET /admin/keys?tenant=` refuses it: it names no tenant, and the event would be
            # filed under whatever it says.
            raise ValueError(f"invalid tenant {tenant[:80]!r}: use 1 to 64 of A-Z a-z 0-9 _ . -")
        store = _store()
        assert isinstance(store, KeyStore)
        with _audit_log(store) as log:
            recs = store.list(tenant)
            # Audited as `GET /admin/keys` is (`key.list`): under the tenant listed, or, for a list
            # of every tenant's keys, under the operator's pseudo-tenant. Nothing is printed
            # unless the read is on record.
            log.append(_event("key.list", tenant or OPERATOR_TENANT, tenant or "*"))
        for rec in recs:
            typer.echo(json.dumps(rec.public()))

    @keys.command("revoke")
    def revoke(key_id: str = typer.Argument(..., metavar="ID", help="the key's id (key_…)")) -> None:
        """Revoke a key; every replica refuses it within a second."""
        from steward.gateway.keys import KeyStore

        store = _store()
        assert isinstance(store, KeyStore)
        with _audit_log(store) as log:
            rec = store.revoke(key_id)
            try:
                log.append(_event("key.revoke", rec.tenant, rec.id))
            except Exception as exc:
                # Unlike a create, the revocation is kept: undoing it would bring back a key its
                # owner meant to kill, the unsafe direction. The missing record is the error
                # (exit 2), so the operator can record the act by hand.
                raise RuntimeError(
                    f"{rec.id} ({rec.prefix}…) IS revoked, but the audit log could not record it "
                    f"({_why(exc)}): the revocation is NOT recorded; record it by hand"
                ) from None
        typer.echo(f"revoked {rec.id} ({rec.prefix}…)", err=True)
