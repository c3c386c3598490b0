"""Coordinator fixtures: an app over a temporary SQLite ledger, its client, a fake clock.

Every app these fixtures build checks its own answers: each JSON answer is validated
(pydantic, strict) against the response model the OpenAPI document names for its route
and status, and a test whose answers drifted from their models fails at teardown.
"""

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
from tests.coordinator.helpers import check_answers, make_config


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
        problems.append(check_answers(app))
        apps.append(app)
        return app

    problems: list[list[str]] = []
    yield build
    for app in apps:
        app.extensions[EXTENSION].close()
    drifted = [p for found in problems for p in found]
    assert not drifted, f"answers that differ from their response models: {drifted[:5]}"


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
