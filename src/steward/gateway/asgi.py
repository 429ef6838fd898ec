"""Entry point for uvicorn workers: every worker builds its app from the same environment."""

from __future__ import annotations

from fastapi import FastAPI

from steward.gateway.app import create_app
from steward.gateway.settings import load_settings


def app_factory() -> FastAPI:
    return create_app(load_settings())
