"""Admin routes: what they refuse, and what their audit records may hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_harness import Running, auth, free_port, start_gateway
from steward.gateway.settings import Settings


@pytest.fixture(scope="module")
def admin_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("admin")), port=free_port(), embedding_model="")
    yield from start_gateway(settings)


def test_a_path_parameter_of_a_refused_request_is_never_recorded(admin_gw: Running) -> None:
    """Refusals are audited before any key is known: the record names the route's template, so
    nobody can write text into the permanent log, or a metrics series per request, without a key."""
    marker = "Jane-Doe-SSN-078-05-1120-"
    for i in range(3):
        r = httpx.put(admin_gw.url + f"/admin/tenants/{marker}{'x' * 2000}{i}", json={"policy": "default"})
        assert r.status_code == 401
    r = httpx.delete(admin_gw.url + f"/admin/keys/{marker}", headers=auth(admin_gw.key("acme", "user")))
    assert r.status_code == 403
    metrics = httpx.get(admin_gw.url + "/metrics", headers=auth(admin_gw.key("acme", "admin"))).text
    assert "078-05-1120" not in metrics and 'route="PUT /admin/tenants/{tenant_id}"' in metrics
    data = admin_gw.settings.data_dir
    stored = b"".join(f.read_bytes() for f in data.iterdir() if f.name.startswith("steward.db"))
    assert b"078-05-1120" not in stored


def test_key_creation_refuses_reserved_tenants_and_endless_lifetimes(admin_gw: Running) -> None:
    h = auth(admin_gw.key("acme", "admin"))
    r = httpx.post(
        admin_gw.url + "/admin/keys", json={"tenant": "_unauthenticated", "role": "auditor"}, headers=h
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tenant"
    r = httpx.post(admin_gw.url + "/admin/keys", json={"tenant": "acme", "expires_in_s": 10**12}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "expires_in_s"
    r = httpx.post(admin_gw.url + "/admin/keys", json={"tenant": "acme", "expires_in_s": 3600}, headers=h)
    assert r.status_code == 201 and r.json()["expires_at"]


def test_a_tenant_id_with_a_trailing_newline_is_refused(admin_gw: Running) -> None:
    """`$` also matches before a final newline: "acme\n" would be a second tenant printed as "acme"."""
    h = auth(admin_gw.key("acme", "admin"))
    r = httpx.put(admin_gw.url + "/admin/tenants/acme%0A", json={"policy": "default"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tenant", r.text
    r = httpx.post(admin_gw.url + "/admin/keys", json={"tenant": "acme\n", "role": "user"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tenant"
    with pytest.raises(ValueError):
        admin_gw.keys.create("acme\n", "user")


def test_audit_query_numbers_in_other_scripts_are_a_400(admin_gw: Running) -> None:
    """str.isdigit() accepts "²" and "١", which int() then refuses: that was a 500."""
    h = auth(admin_gw.key("acme", "auditor"))
    for q in ("after=%C2%B2", "limit=%D9%A1", "after=%EF%BC%91"):
        r = httpx.get(admin_gw.url + "/audit/events?" + q, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", (q, r.text)


def _events(gw: Running, tenant: str) -> list[dict[str, Any]]:
    """Every event filed under `tenant`, read the way its auditors read them."""
    r = httpx.get(gw.url + "/audit/events?limit=1000", headers=auth(gw.key(tenant, "auditor")))
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def test_a_created_key_whose_record_fails_is_revoked(admin_gw: Running) -> None:
    """No key outlives a failed audit record: the 503 says the act was not served, and the key it
    made (whose plaintext was never sent) is revoked, as `steward keys create` does."""
    gateway: Any = admin_gw.gateway
    inner = gateway.on_finish

    def failing(trace: Any) -> Any:
        if trace.usage.get("admin_action") == "key.create":
            raise RuntimeError("the audit store is full")
        return inner(trace) if inner is not None else None

    h = auth(admin_gw.key("ops", "admin"))
    gateway.on_finish = failing
    try:
        r = httpx.post(admin_gw.url + "/admin/keys", json={"tenant": "undone", "role": "admin"}, headers=h)
    finally:
        gateway.on_finish = inner
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable", r.text
    (rec,) = admin_gw.keys.list("undone")
    assert rec.revoked_at is not None


@pytest.mark.parametrize(
    ("models", "param"),
    [
        ([""], "models[0]"),
        (["builtin", "  "], "models[1]"),
        (["m" * 300], "models[0]"),
        (["m"] * 300, "models"),
    ],
)
def test_key_creation_refuses_what_the_cli_refuses_in_models(
    admin_gw: Running, models: list[str], param: str
) -> None:
    h = auth(admin_gw.key("acme", "admin"))
    r = httpx.post(admin_gw.url + "/admin/keys", json={"tenant": "models-t", "models": models}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert admin_gw.keys.list("models-t") == []


def test_key_model_bounds_are_the_clis() -> None:
    from steward.commands import keys
    from steward.gateway.routes import admin

    assert (keys.MAX_MODEL_CHARS, keys.MAX_KEY_MODELS) == (admin.MAX_MODEL_CHARS, admin.MAX_KEY_MODELS)


def test_a_tenant_query_that_cannot_name_a_tenant_is_a_400(admin_gw: Running) -> None:
    """Cut to 64 characters it named another, existing tenant, whose auditors then saw a list of
    their keys that never happened."""
    victim = "t" * 64
    admin_gw.key(victim, "user")
    h = auth(admin_gw.key("ops", "admin"))
    for bad in (victim + "-other", "acme\n", "_unauthenticated", ""):
        r = httpx.get(admin_gw.url + "/admin/keys", params={"tenant": bad}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tenant", (bad, r.text)
    assert not [e for e in _events(admin_gw, victim) if e["detail"].get("action") == "key.list"]
    r = httpx.get(admin_gw.url + "/admin/keys", params={"tenant": victim}, headers=h)
    assert r.status_code == 200 and {k["role"] for k in r.json()["data"]} == {"user", "auditor"}


def test_metrics_reads_and_refusals_are_audited(admin_gw: Running) -> None:
    """/metrics is every tenant's volume: read like /admin/tenants, recorded like it."""
    admin, user = admin_gw.key("metrics-ops", "admin"), admin_gw.key("metrics-acme", "user")
    ok = httpx.get(admin_gw.url + "/metrics", headers=auth(admin))
    refused = httpx.get(admin_gw.url + "/metrics", headers=auth(user))
    assert (ok.status_code, refused.status_code) == (200, 403)
    assert ok.headers["content-type"].startswith("text/plain")
    ops = {e["request_id"]: e for e in _events(admin_gw, "metrics-ops")}
    acme = {e["request_id"]: e for e in _events(admin_gw, "metrics-acme")}
    read = ops[ok.headers["x-request-id"]]
    assert read["route"] == "GET /metrics" and read["status"] == 200 and read["kind"] == "admin", read
    assert read["detail"]["action"] == "metrics.read"
    denied = acme[refused.headers["x-request-id"]]
    assert denied["status"] == 403 and denied["outcome"] == "refused", denied


def test_an_auditor_is_listed_no_inference_models(admin_gw: Running) -> None:
    """An auditor may call no inference route, so it may use no model: /v1/models says so, as
    /v1/models/{id} does, rather than list models that then answer 403."""
    auditor = auth(admin_gw.key("acme", "auditor"))
    r = httpx.get(admin_gw.url + "/v1/models", headers=auditor)
    assert r.status_code == 200 and r.json() == {"object": "list", "data": []}, r.text
    assert httpx.get(admin_gw.url + "/v1/models/builtin", headers=auditor).status_code == 404
    user = auth(admin_gw.key("acme", "user"))
    assert [m["id"] for m in httpx.get(admin_gw.url + "/v1/models", headers=user).json()["data"]] == [
        "builtin"
    ]
