"""Admin routes: what they refuse, and what their audit records may hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
