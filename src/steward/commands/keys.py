"""`steward keys create|list|revoke`: manage API keys on the store directly (server running or not)."""

from __future__ import annotations

import json

import typer


def _store() -> object:
    from steward.gateway.keys import KeyStore
    from steward.store import upgrade

    return KeyStore(upgrade())


def _audit(store: object, action: str, tenant: str, target: str) -> None:
    """Key management from the CLI is an admin act like any other: it goes into the audit log."""
    import getpass

    from steward.audit import AuditEvent, AuditLog, Principal
    from steward.gateway.keys import KeyStore
    from steward.store.db import data_dir

    assert isinstance(store, KeyStore)
    log = AuditLog.open(store.engine, data_dir() / "keys")
    try:
        log.append(
            AuditEvent(
                kind="admin",
                principal=Principal(tenant=tenant, key_id=None, key_prefix=None, role="cli"),
                outcome="ok",
                route=f"cli keys {action.split('.')[-1]}",
                detail={"action": action, "target": target, "os_user": getpass.getuser()},
            )
        )
    finally:
        log.close()


# The admin API's bounds (`routes/admin.py` MAX_KEY_LIFETIME_S, `schemas.KeyCreate`), repeated here so
# that `steward keys` does not import the web app; tests/test_cli_config.py keeps them equal.
MAX_KEY_LIFETIME_S = 10 * 365 * 24 * 3600
MAX_NAME_CHARS = 128
MAX_MODEL_CHARS = 256  # a request's `model` is at most this long: a longer name could never match


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
        key, rec = store.create(tenant, role, name=name, models=model, expires_in_s=expires_in)
        _audit(store, "key.create", rec.tenant, rec.id)
        typer.echo(key)
        typer.echo(f"created {rec.id} ({rec.prefix}…) for tenant {rec.tenant}, role {rec.role}", err=True)

    @keys.command("list")
    def list_(tenant: str | None = typer.Option(None, "--tenant", help="only this tenant's keys")) -> None:
        """List keys as JSON lines (prefixes only, never the keys)."""
        from steward.gateway.keys import KeyStore

        store = _store()
        assert isinstance(store, KeyStore)
        for rec in store.list(tenant):
            typer.echo(json.dumps(rec.public()))

    @keys.command("revoke")
    def revoke(key_id: str = typer.Argument(..., metavar="ID", help="the key's id (key_…)")) -> None:
        """Revoke a key; every replica refuses it within a second."""
        from steward.gateway.keys import KeyStore

        store = _store()
        assert isinstance(store, KeyStore)
        rec = store.revoke(key_id)
        _audit(store, "key.revoke", rec.tenant, rec.id)
        typer.echo(f"revoked {rec.id} ({rec.prefix}…)", err=True)
