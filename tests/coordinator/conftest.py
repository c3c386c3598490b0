"""Coordinator fixtures: an app over a temporary SQLite ledger, its client, a fake clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from coordinator import create_app
from coordinator.state import EXTENSION, CoordinatorState
from rendezvous.memory import MemoryBackend
from tests.coordinator.helpers import make_config


class FakeClock:
    """Wall-clock time that only moves when a test moves it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Build apps over `tmp_path/ledger.db` (config overrides and create_app kwargs)."""
    apps: list[Flask] = []

    def build(backend: Any = None, clock: Callable[[], float] | None = None,
              **overrides: Any) -> Flask:
        kwargs: dict[str, Any] = {"backend": backend}
        if clock is not None:
            kwargs["clock"] = clock
        app = create_app(make_config(tmp_path, **overrides), **kwargs)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions[EXTENSION].close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def state(app: Flask) -> CoordinatorState:
    return app.extensions[EXTENSION]
