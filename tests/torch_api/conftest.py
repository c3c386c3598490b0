"""Fixtures of the `elastic.torch` API suite: one launch of N workers per module."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Workers, python, unique_job, worker_env

WORKER = Path(__file__).resolve().parent / "scripts" / "api_worker.py"
LAUNCH_LIMIT = 60.0  # seconds for one launch: start, every check, shutdown


@dataclass
class Run:
    """What a launch of the API worker left behind: exit codes, logs, per-rank results."""

    np: int
    codes: list[int | None]
    output: str
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, name: str) -> list[Any]:
        """Assert that check `name` passed on every rank; return each rank's value."""
        assert self.codes == [0] * self.np, f"exit codes {self.codes}\n{self.output}"
        values = []
        for rank, result in enumerate(self.results):
            entry = result.get(name)
            assert entry is not None, f"rank {rank} did not run {name}\n{self.output}"
            assert entry["ok"], f"{name} failed on rank {rank}:\n{entry.get('error')}"
            values.append(entry.get("value"))
        return values


def launch(etcd_url: str, out: Path, np: int, suite: str, worker: Path = WORKER) -> Run:
    out.mkdir(parents=True, exist_ok=True)
    env = worker_env(etcd_url, unique_job("api"), np,
                     extra={"HORDE_TEST_OUT": str(out), "HORDE_TEST_SUITE": suite})
    workers = Workers()
    start = time.monotonic()
    try:
        for i in range(np):
            workers.start(python(worker), env, out / f"worker{i}.log")
        codes = workers.wait(LAUNCH_LIMIT)
    finally:
        workers.kill_all()
    run = Run(np, codes, workers.all_output(), seconds=time.monotonic() - start)
    for rank in range(np):
        path = out / f"result-{rank}.json"
        run.results.append(json.loads(path.read_text()) if path.exists() else {})
    return run


@pytest.fixture(scope="module")
def two(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Two workers that ran the whole suite."""
    return launch(etcd_server.url, tmp_path_factory.mktemp("api2"), 2, "two")


@pytest.fixture(scope="module")
def three(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Three workers that ran the checks that need (or profit from) a third rank."""
    return launch(etcd_server.url, tmp_path_factory.mktemp("api3"), 3, "three")
