"""A real volunteer job: etcd, a coordinator serving an owner-signed manifest, the owner's
own `horderun`, and `horde-volunteer join` agents in their own processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.coordinator.serverproc import ServerProcess
from tests.harness import REPO, unique_job
from volunteer_client.agent import AgentError, call_agent

JOB_SCRIPT = Path(__file__).with_name("job") / "train.py"


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`horde-volunteer ARGS` in a child process."""
    return subprocess.run([sys.executable, "-m", "volunteer_client.cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env=env or base_env())


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    for name in list(env):
        if name.startswith("HORDE_"):
            del env[name]
    env["HORDE_CONFIG"] = "/nonexistent/horde-volunteer.toml"
    return env


@dataclass
class VolunteerJob:
    """Everything a test needs to run volunteers against one signed job."""

    root: Path
    etcd_url: str
    job: str
    coordinator: ServerProcess
    job_dir: Path
    owner_key: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.coordinator.url}/{self.job}"

    def sign(self, *entry: str) -> None:
        done = cli("manifest", "sign", "--key", str(self.owner_key), "--dir", str(self.job_dir),
                   "--job", self.job, "--rendezvous", self.etcd_url, "--requirement", "psutil",
                   "--description", "test job", "--owner", "tests", "--", *entry)
        assert done.returncode == 0, done.stderr

    def owner(self, *args: str, np: int = 1) -> subprocess.Popen:
        """The job owner's `horderun ... python ARGS` (publishes the job; its worker
        trains too)."""
        work = self.root / "owner"
        shutil.copytree(self.job_dir, work, dirs_exist_ok=True)
        log = open(self.root / "owner.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "elastic.launcher.cli", "-np", str(np), "--min-np", "1",
             "--max-np", "8", "--rendezvous", self.etcd_url, "--job", self.job,
             "--lease-ttl", "2", "--settle-window", "0.3", "--coordinator",
             self.coordinator.url, "--node-id-prefix", "owner", sys.executable, *args],
            cwd=work, env=base_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.procs.append(proc)
        return proc

    def volunteer(self, name: str, *flags: str) -> tuple[subprocess.Popen, Path]:
        """`horde-volunteer join URL --yes` with its own data folder."""
        data = self.root / name
        data.mkdir(exist_ok=True)
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "volunteer_client.cli", "--log-level", "INFO", "join",
             self.url, "--data-dir", str(data), "--poll-seconds", "0.5", "--resume-after",
             "0", *flags],
            cwd=REPO, env=base_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.procs.append(proc)
        return proc, data

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def status(data: Path) -> dict:
    return call_agent(data, "GET", "/status")


def wait_for(predicate, timeout: float, what, interval: float = 0.5):  # noqa: ANN001
    """Poll `predicate` until it returns a truthy value; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except AgentError as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})")


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes (0 for gone ones)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def records(data_or_dir: Path) -> dict[str, list[dict]]:
    """The job script's results/*.jsonl under a folder, per node id."""
    found: dict[str, list[dict]] = {}
    for path in data_or_dir.rglob("results/*.jsonl"):
        found[path.stem] = [json.loads(line) for line in path.read_text().splitlines()
                            if line.strip()]
    return found


@pytest.fixture
def volunteer_job(etcd_server: object, tmp_path: Path) -> Iterator[VolunteerJob]:
    job = unique_job("vol")
    job_dir = tmp_path / "jobdir"
    job_dir.mkdir()
    shutil.copy(JOB_SCRIPT, job_dir / "train.py")
    key = tmp_path / "owner.key"
    done = cli("manifest", "keygen", "--key", str(key))
    assert done.returncode == 0, done.stderr
    server = ServerProcess(f"sqlite:///{tmp_path}/ledger.sqlite", tmp_path, "--rendezvous",
                           etcd_server.url, "--job", job,  # type: ignore[attr-defined]
                           "--manifest-dir", str(job_dir))
    server.start()
    vj = VolunteerJob(tmp_path, etcd_server.url, job, server, job_dir, key)  # type: ignore[attr-defined]
    try:
        yield vj
    finally:
        for proc in vj.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in vj.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        server.stop()
