"""Bad configuration and bad arguments on the command line: one line on stderr, exit 2, nothing
started or written (review 1: H1 for the serve config, M1, M2, M5, L4, L5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from steward.gateway.settings import ConfigError, Settings, load_settings

STEWARD = [sys.executable, "-m", "steward.cli"]


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")}
    env.update({"STEWARD_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"})
    if "STEWARD_SHARED_DATA" in os.environ:
        env["STEWARD_SHARED_DATA"] = os.environ["STEWARD_SHARED_DATA"]
    env.update(extra)
    return env


def _steward(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEWARD, *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(autouse=True)
def _restore_environ() -> object:
    """`load_settings(config)` and `steward serve` set STEWARD_* variables for their workers."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "\n" not in err and err.startswith("steward: error: "), r.stderr
    return err


# -- H1: the serve config refuses duplicate keys ---------------------------------------------------
def test_duplicate_key_in_the_serve_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEWARD_CONFIG", raising=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 8001\nguards: true\nguards: false\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert str(err.value) == f"config file {cfg}:3: duplicate key 'guards'"


def test_duplicate_key_nested_in_the_serve_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STEWARD_CONFIG", raising=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("models:\n  - name: a\n    backend: builtin\n    name: b\n")
    with pytest.raises(ConfigError, match=r":4: duplicate key 'name'"):
        load_settings(cfg)


# -- M1: what serve checks before it binds ---------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "env", "needle"),
    [
        ("", {"STEWARD_DATABASE_URL": "::::"}, "invalid setting database_url: invalid database URL"),
        ("database_url: 'mysql://x'\n", {}, "invalid setting database_url: unsupported database"),
        (
            "database_url: 'postgresql://u:s3cret@127.0.0.1:1/x'\n",
            {},
            "database_url: cannot migrate the store at postgresql+psycopg://u:***@127.0.0.1:1/x",
        ),
        ("redis_url: notredis\n", {}, "invalid setting redis_url: "),
        ("models: [{name: x, backend: hf, path: /nonexistent}]\n", {}, "models.0.path: "),
        ("models: [{name: x, backend: builtin, path: /nonexistent}]\n", {}, "models.0.path: "),
        ("models: [{name: x, backend: openai, base_url: 'not a url'}]\n", {}, "base_url"),
        ("host: 999.1.1.1\n", {}, "invalid setting host: "),
    ],
)
def test_serve_refuses_bad_config_before_binding(
    tmp_path: Path, config: str, env: dict[str, str], needle: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config or "{}\n")
    r = _steward("serve", "--config", str(cfg), "--port", "1", env=_env(tmp_path / "d", **env))
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr[-2000:])
    err = _one_line(r)
    assert needle in err, err
    assert "s3cret" not in err and "errors.pydantic.dev" not in err


def test_openai_base_url_is_checked_with_the_settings() -> None:
    with pytest.raises(ConfigError, match=r"invalid setting models\.0: .*base_url must start with http"):
        load_settings(None, models=[{"name": "x", "backend": "openai", "base_url": "not a url"}])
    with pytest.raises(ConfigError, match=r"base_url .* has no host"):
        load_settings(None, models=[{"name": "x", "backend": "openai", "base_url": "http:///v1"}])
    s = load_settings(None, models=[{"name": "x", "backend": "openai", "base_url": "http://127.0.0.1:1/v1"}])
    assert s.models[0].base_url == "http://127.0.0.1:1/v1"


# -- M2: a tenant bound to a policy the policy file lacks ------------------------------------------
def _bind(data: Path, tenant: str, policy: str) -> None:
    from steward.gateway.keys import KeyStore
    from steward.store import upgrade

    data.mkdir(parents=True, exist_ok=True)
    ks = KeyStore(upgrade(f"sqlite:///{data / 'steward.db'}"))
    ks.set_tenant(tenant, policy=policy)
    ks.engine.dispose()


def test_serve_warns_of_a_tenant_bound_to_a_missing_policy_and_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One stale binding must not take every tenant down (and the way to clear it is the running
    gateway's admin API): the preflight says so in a warning line and lets the gateway start."""
    from steward.commands.serve import _preflight

    data = tmp_path / "d"
    _bind(data, "acme", "strict")
    _preflight(Settings(data_dir=data, embedding_model=""))
    err = capsys.readouterr().err
    assert err.startswith("warning: tenant 'acme' is bound to guard policy 'strict'"), err
    assert err.count("\n") == 1


def test_a_tenant_bound_to_a_missing_policy_is_refused_alone_until_an_admin_rebinds_it(
    tmp_path: Path,
) -> None:
    import httpx

    from gateway_harness import auth, free_port, start_gateway

    data = tmp_path / "d"
    _bind(data, "acme", "strict")
    _bind(data, "beta", "")  # a cleared binding is no binding
    body = {"model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for gw in start_gateway(Settings(data_dir=data, port=free_port(), embedding_model="")):
        url = gw.url + "/v1/chat/completions"
        r = httpx.post(url, json=body, headers=auth(gw.key("acme", "user")), timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "policy_unavailable", r.text
        assert "'strict'" in r.json()["error"]["message"]
        assert httpx.post(url, json=body, headers=auth(gw.key("beta", "user")), timeout=60).status_code == 200
        admin = auth(gw.key("ops", "admin"))
        fix = httpx.put(gw.url + "/admin/tenants/acme", json={"policy": ""}, headers=admin, timeout=30)
        assert fix.status_code == 200, fix.text
        r = httpx.post(url, json=body, headers=auth(gw.key("acme", "user")), timeout=60)
        assert r.status_code == 200, r.text


# -- M5, L5: keys create refuses what the admin API refuses ----------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--expires-in", str(10**20)], "--expires-in must be at most 315360000"),
        (["--expires-in", str(10**13)], "--expires-in must be at most 315360000"),
        (["--expires-in", str(10**11)], "--expires-in must be at most 315360000"),
        (["--model", ""], "--model"),
        (["--model", "builtin", "--model", ""], "--model"),
        (["--name", "n" * 5000], "--name"),
    ],
)
def test_keys_create_refuses_bad_arguments_and_creates_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    env = _env(tmp_path / "d")
    r = _steward("keys", "create", "--tenant", "acme", *args, env=env)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert needle in _one_line(r)
    listed = _steward("keys", "list", env=env)
    assert listed.returncode == 0 and listed.stdout == ""


def test_keys_cli_cap_is_the_admin_apis() -> None:
    from steward.commands import keys
    from steward.gateway.routes.admin import MAX_KEY_LIFETIME_S

    assert keys.MAX_KEY_LIFETIME_S == MAX_KEY_LIFETIME_S


def test_keys_create_accepts_ten_years(tmp_path: Path) -> None:
    env = _env(tmp_path / "d")
    r = _steward(
        "keys", "create", "--tenant", "acme", "--expires-in", "315360000", "--name", "n" * 128, env=env
    )
    assert r.returncode == 0, r.stderr


def test_arithmetic_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from steward import cli

    def boom(*a: object, **k: object) -> None:
        raise OverflowError("date value out of range")

    monkeypatch.delenv("STEWARD_DEBUG", raising=False)
    monkeypatch.setattr(cli, "app", boom)
    monkeypatch.setattr(cli, "_register", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "steward: error: date value out of range\n"


# -- L4: steward scan names the policy it applied -------------------------------------------------
PATTERN_POLICY = {
    "version": 1,
    "policies": {"default": {"input": [{"scanner": "secrets", "action": "block"}]}},
}


@pytest.fixture()
def scan_app() -> typer.Typer:
    from steward.commands import scan

    a = typer.Typer()
    scan.register(a)

    @a.command("noop")
    def _noop() -> None: ...

    return a


def test_scan_text_output_names_policy_and_version(scan_app: typer.Typer, tmp_path: Path) -> None:
    from steward.guard.policy import load_policy_set

    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(PATTERN_POLICY))
    version = load_policy_set(p).policies["default"].version()
    r = CliRunner().invoke(scan_app, ["scan", "--policy", str(p), "hello"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["policy"] == "default" and out["policy_version"] == version


def test_scan_jsonl_lines_keep_the_documented_keys(scan_app: typer.Typer, tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(PATTERN_POLICY))
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"text": "hello"}\n')
    r = CliRunner().invoke(scan_app, ["scan", "--policy", str(p), "--jsonl", str(lines)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"flagged", "categories", "scores", "findings", "action"}


# -- review 30, finding 1: a key act the audit log cannot record is refused, or undone -------------
def _cli_events(data: Path, tenant: str) -> list[dict[str, object]]:
    """The audit events filed under `tenant` in the store at `data`: route and detail of each."""
    from steward.audit import AuditLog
    from steward.store import upgrade

    engine = upgrade(f"sqlite:///{data / 'steward.db'}")
    log = AuditLog.open(engine, data / "keys", read_only=True)
    try:
        events = log.list_events(tenant=tenant, after=-1, limit=1000)
        return [{"route": e.meta["route"], **e.meta["detail"]} for e in events]
    finally:
        log.close()
        engine.dispose()


def test_keys_create_and_revoke_without_the_audit_keys_change_nothing(tmp_path: Path) -> None:
    """A second host (or a wrong STEWARD_DATA_DIR) reaches the store but not its audit keys: the
    audit log is opened before the store is touched, so both acts are refused and nothing changes."""
    a, b = tmp_path / "a", tmp_path / "b"
    env = _env(a)
    first = _steward("keys", "create", "--tenant", "t1", env=env)
    assert first.returncode == 0, first.stderr
    before = _steward("keys", "list", env=env).stdout
    key_id = json.loads(before)["id"]
    elsewhere = _env(b, STEWARD_DATABASE_URL=f"sqlite:///{a / 'steward.db'}")
    r = _steward("keys", "create", "--tenant", "t1", "--role", "admin", env=elsewhere)
    assert r.returncode == 2 and r.stdout == "" and "audit-kek" in _one_line(r), r.stderr
    r = _steward("keys", "revoke", key_id, env=elsewhere)
    assert r.returncode == 2 and "audit-kek" in _one_line(r), r.stderr
    after = _steward("keys", "list", env=env).stdout
    assert [json.loads(line) for line in after.splitlines()] == [json.loads(before)]
    assert [e["action"] for e in _cli_events(a, "t1")] == ["key.create"]


def test_keys_create_undoes_the_key_when_the_audit_append_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from steward import cli
    from steward.audit import AuditLog
    from steward.audit.log import AuditError

    data = tmp_path / "d"
    monkeypatch.setenv("STEWARD_DATA_DIR", str(data))
    monkeypatch.delenv("STEWARD_DATABASE_URL", raising=False)

    def steward_main(*args: str) -> object:
        with pytest.raises(SystemExit) as exit_:
            cli.main(list(args))
        return exit_.value.code

    assert steward_main("keys", "create", "--tenant", "t1") == 0
    capsys.readouterr()

    def broken(self: AuditLog, event: object) -> object:
        raise AuditError("disk full")

    original = AuditLog.append
    monkeypatch.setattr(AuditLog, "append", broken)
    code = steward_main("keys", "create", "--tenant", "t1", "--role", "admin")
    out = capsys.readouterr()
    assert code == 2 and out.out == "", out
    assert "disk full" in out.err and "revoked" in out.err and out.err.count("\n") == 1, out.err
    monkeypatch.setattr(AuditLog, "append", original)  # `keys list` is audited too
    assert steward_main("keys", "list", "--tenant", "t1") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    admins = [r for r in rows if r["role"] == "admin"]
    assert len(admins) == 1 and admins[0]["revoked_at"], rows  # created, then undone
    user = next(r for r in rows if r["role"] == "user")
    monkeypatch.setattr(AuditLog, "append", broken)
    code = steward_main("keys", "revoke", user["id"])
    err = capsys.readouterr().err
    # The revocation stands (re-enabling a key someone meant to kill is the unsafe direction), and
    # the operator is told, on the one error line, that its record is missing.
    assert code == 2 and "NOT recorded" in err and user["id"] in err and err.count("\n") == 1, err
    monkeypatch.setattr(AuditLog, "append", original)
    assert steward_main("keys", "list", "--tenant", "t1") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["revoked_at"] for r in rows), rows


def test_keys_list_is_audited_as_get_admin_keys_is(tmp_path: Path) -> None:
    env = _env(tmp_path / "d")
    assert _steward("keys", "create", "--tenant", "t1", env=env).returncode == 0
    r = _steward("keys", "list", "--tenant", "t1", env=env)
    assert r.returncode == 0 and r.stdout.count("\n") == 1, r.stderr
    events = _cli_events(tmp_path / "d", "t1")
    assert [(e["route"], e["action"]) for e in events][-1] == ("cli keys list", "key.list"), events
    r = _steward("keys", "list", "--tenant", "t" * 64 + "-other", env=env)
    assert r.returncode == 2 and "invalid tenant" in _one_line(r)
