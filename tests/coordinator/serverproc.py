"""Run `horde-coordinator serve` (waitress) in a child process for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.coordinator.helpers import ADMIN_TOKEN

START_TIMEOUT = 30.0


class ServerProcess:
    """A coordinator child process on a free loopback port; `kill()` is SIGKILL."""

    def __init__(self, db_url: str, workdir: Path, *extra: str,
                 trust_reported_membership: bool = True) -> None:
        self.db_url = db_url
        self.trust = trust_reported_membership
        self.workdir = workdir
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = workdir / "server.log"
        self.starts = 0

    def start(self) -> str:
        self.starts += 1
        port_file = self.workdir / f"port-{self.starts}"
        # the crash tests run without a rendezvous: a quorum of reports sets membership
        env = {**os.environ, "HORDE_COORDINATOR_ADMIN_TOKEN": ADMIN_TOKEN,
               "HORDE_COORDINATOR_TRUST_REPORTED_MEMBERSHIP": "1" if self.trust else "0"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli", "--log-level", "WARNING", "serve",
                 "--db", self.db_url, "--port", "0", "--port-file", str(port_file),
                 *self.extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            if port_file.exists():
                self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
                try:
                    with urllib.request.urlopen(self.url + "/api/v1/health", timeout=2):
                        return self.url
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"coordinator did not start within {START_TIMEOUT} s: "
                           f"{self.log_path.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, exactly a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
