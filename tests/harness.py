"""Start real worker processes against a real etcd, with a deadline and full cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rendezvous.embedded import EmbeddedEtcd

REPO = Path(__file__).resolve().parents[1]


def worker_env(etcd_url: str, job: str, np: int, min_np: int | None = None,
               max_np: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment horderun would give a worker of `job` (settings tuned for tests)."""
    env = dict(os.environ)
    env.update({
        "HORDE_RENDEZVOUS": etcd_url,
        "HORDE_JOB": job,
        "HORDE_TARGET_NP": str(np),
        "HORDE_MIN_NP": str(min_np if min_np is not None else np),
        "HORDE_MAX_NP": str(max_np if max_np is not None else np),
        "HORDE_LEASE_TTL": "2",
        "HORDE_SETTLE_WINDOW": "0.3",
        "HORDE_START_TIMEOUT": "30",
        "HORDE_ELASTIC_TIMEOUT": "30",
        "HORDE_COLLECTIVE_TIMEOUT": "30",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    if extra:
        env.update(extra)
    return env


def unique_job(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Workers:
    """A set of worker processes started from one script; always reaped."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, cmd: Sequence[str], env: Mapping[str, str], log: Path,
              node_id: str | None = None) -> subprocess.Popen:
        env = dict(env)
        if node_id:
            env["HORDE_NODE_ID"] = node_id
        handle = open(log, "wb")  # noqa: SIM115 - closed when the process is reaped
        proc = subprocess.Popen(list(cmd), env=env, stdout=handle, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
        proc._log_handle = handle  # type: ignore[attr-defined]
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def wait(self, timeout: float) -> list[int | None]:
        """Exit codes of every process, killing those still running at the deadline."""
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in self.procs:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                codes.append(proc.wait(remaining))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.kill_all()
        return codes

    def output(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def all_output(self) -> str:
        return "\n".join(f"--- worker {i} ---\n{self.output(i)}" for i in range(len(self.logs)))

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
            handle = getattr(proc, "_log_handle", None)
            if handle is not None:
                handle.close()


def python(script: Path | str, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def repo_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable and `extra` variables set."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def horderun(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120
             ) -> subprocess.CompletedProcess:
    """Run `horderun ARGS` to completion (output captured) from the repository root."""
    return subprocess.run([sys.executable, "-m", "elastic.launcher.cli", *args],
                          env=dict(env) if env is not None else repo_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_workers_json(tmp_path: Path, np: int, script: str, *, timeout: float = 120,
                     **env: str) -> list[dict]:
    """Run SCRIPT under `horderun -np N` (killed after `timeout` seconds); each rank writes
    $OUT/rank<r>.json; return them."""
    import json

    result = horderun("-np", str(np), "--log-level", "WARNING", "--coordinator", "none",
                      sys.executable, script, env=repo_env(OUT=str(tmp_path), **env),
                      timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(np)]


@contextmanager
def auth_etcd(name: str) -> Iterator[tuple[EmbeddedEtcd, str, Path]]:
    """A fresh embedded etcd with auth on for one job named after `name`:
    (server, job, root password file). Skips the test when there is no etcd binary."""
    import pytest

    from rendezvous.embedded import EmbeddedEtcd, etcd_binary
    from rendezvous.errors import RendezvousError
    from rendezvous.settings import DEFAULT_PREFIX

    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")
    job = unique_job(name)
    server = EmbeddedEtcd()
    try:
        yield server, job, server.enable_auth(job, prefix=DEFAULT_PREFIX)
    finally:
        server.stop()
