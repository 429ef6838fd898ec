"""Fixtures: a running gateway with the built-in model, and keys for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_harness import Running, free_port, start_gateway
from steward.gateway.settings import Settings


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data = tmp_path_factory.mktemp("gw")
    settings = Settings(data_dir=Path(data), port=free_port(), batch_wait_ms=5.0, key_cache_ttl_s=0.2)
    yield from start_gateway(settings)


@pytest.fixture(scope="session")
def user_key(gateway: Running) -> str:
    return gateway.key("acme", "user")


@pytest.fixture(scope="session")
def admin_key(gateway: Running) -> str:
    return gateway.key("ops", "admin")
