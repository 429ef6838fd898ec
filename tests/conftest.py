"""Shared fixtures: the location of ../shared/data and a deterministic torch setup."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# Throwaway PostgreSQL and Redis servers (tests/servers.py) are fixtures for every test directory.
sys.path.insert(0, str(Path(__file__).parent))
from servers import fresh_pg_url, fresh_redis_url, pg_server, pg_url, redis_server, redis_url  # noqa: E402, F401


def _shared_data() -> Path | None:
    env = os.environ.get("STEWARD_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("../shared/data is missing in CI")
        pytest.skip("../shared/data not found (set STEWARD_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
