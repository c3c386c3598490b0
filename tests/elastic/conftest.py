"""Helpers for end-to-end tests that run `horderun` itself against a real etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
FAST = ["--lease-ttl", "2", "--settle-window", "0.3", "--start-timeout", "30",
        "--collective-timeout", "30", "--reset-timeout", "5"]


class Job:
    """A running `horderun` (and any `--join` launchers) with its records directory."""

    def __init__(self, etcd_url: str, out: Path, name: str) -> None:
        self.etcd_url = etcd_url
        self.out = out
        self.name = name
        self.launchers: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HORDE_TEST_OUT": str(self.out), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
        env.update(extra or {})
        return env

    def horderun(self, *args: str, script: str = "elastic_worker.py",
                 env: dict[str, str] | None = None, join: bool = False) -> subprocess.Popen:
        log = self.out / f"launcher{len(self.launchers)}.log"
        cmd = [sys.executable, "-m", "elastic.launcher.cli", "--rendezvous", self.etcd_url,
               "--job", self.name, *(["--join"] if join else []), *FAST, *args,
               sys.executable, str(SCRIPTS / script)]
        handle = open(log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=self.env(env), stdout=handle, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
        proc._log = handle  # type: ignore[attr-defined]
        self.launchers.append(proc)
        self.logs.append(log)
        return proc

    def output(self) -> str:
        return "\n".join(f"=== {p.name} ===\n{p.read_text(errors='replace')}" for p in self.logs)

    def records(self) -> list[dict]:
        rows = []
        for path in sorted(self.out.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    rows.append(json.loads(line))
        return sorted(rows, key=lambda r: r["time"])

    def commits(self) -> list[dict]:
        return [r for r in self.records() if r["event"] == "commit"]

    def pids_by_node(self) -> dict[str, set[int]]:
        result: dict[str, set[int]] = {}
        for r in self.records():
            result.setdefault(r["node"], set()).add(r["pid"])
        return result

    def latest_pid(self, rank: int) -> int:
        rows = [r for r in self.records() if r["rank"] == rank]
        return rows[-1]["pid"]

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if all(p.poll() is not None for p in self.launchers):
                break
            time.sleep(0.1)
        if predicate():
            return
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.output()}")

    def finish(self, timeout: float = 90) -> list[int | None]:
        codes = []
        deadline = time.monotonic() + timeout
        for proc in self.launchers:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def cleanup(self) -> None:
        for proc in self.launchers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(8)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(5)
            proc._log.close()  # type: ignore[attr-defined]


@pytest.fixture
def job(etcd_server: object, tmp_path: Path) -> Iterator[Job]:
    out = tmp_path / "records"
    out.mkdir()
    j = Job(etcd_server.url, out, f"test-{uuid.uuid4().hex[:8]}")  # type: ignore[attr-defined]
    try:
        yield j
    finally:
        j.cleanup()


def check_identical_parameters(commits: list[dict]) -> int:
    """Every member that committed a (generation, epoch, batch) holds the same parameters."""
    seen: dict[tuple, set[str]] = {}
    for c in commits:
        seen.setdefault((c["generation"], c["epoch"], c["batch"]), set()).add(c["params"])
    diverged = {k: v for k, v in seen.items() if len(v) > 1}
    assert not diverged, f"members diverged at {diverged}"
    return len(seen)
