"""Two network namespaces joined by one veth pair: two "machines" on one host.

    with VethLab() as lab:                        # root only; deleted on exit, always
        owner = lab.popen(lab.ns_a, [...], env, log)   # serves on lab.addr_a (10.77.0.1)
        joiner = lab.popen(lab.ns_b, [...], env, log)  # dials it from lab.addr_b

Nothing is created in the root namespace: the veth pair runs straight from A to B, so the
lab's addresses clash with nothing, and two labs can run at once (names carry the pid
and a random tag).
Cleanup (on `__exit__` and at interpreter exit) kills the process groups started with
`popen`, then every process still inside either namespace, by pid, then deletes the
namespaces (which deletes the veth pair with them). Only what this lab created is touched.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

#: Seconds a started process group gets between SIGTERM and SIGKILL at cleanup.
STOP_GRACE = 5.0


class LabUnavailable(RuntimeError):
    """This machine cannot host the lab (not Linux, not root, no `ip`, no namespaces)."""


def require_netns() -> None:
    """Raise LabUnavailable with the reason unless this is Linux, as root, with `ip`."""
    if not sys.platform.startswith("linux"):
        raise LabUnavailable(f"network namespaces need Linux; this is {sys.platform}")
    if os.geteuid() != 0:
        raise LabUnavailable("the lab creates network namespaces and a veth pair, which needs "
                             "root (euid 0); run the test as root, e.g. with sudo -E")
    if shutil.which("ip") is None:
        raise LabUnavailable("the lab needs `ip` (package iproute2) to create namespaces")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise LabUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


class VethLab:
    """Namespaces A (`addr_a` on `iface_a`) and B (`addr_b` on `iface_b`); see module doc."""

    def __init__(self, subnet: str = "10.77.0") -> None:
        require_netns()
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"  # unique even across pid reuse
        self.ns_a, self.ns_b = f"horde-lab-{tag}-a", f"horde-lab-{tag}-b"
        self.iface_a, self.iface_b = f"hl{tag}a", f"hl{tag}b"  # at most 12 of Linux's 15
        self.addr_a, self.addr_b = f"{subnet}.1", f"{subnet}.2"
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False

    def __enter__(self) -> VethLab:
        atexit.register(self.cleanup)
        try:
            self._create()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    def _create(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
            self._namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.ns_a, "link", "add", self.iface_a, "type", "veth", "peer", "name",
            self.iface_b, "netns", self.ns_b)
        for ns, iface, addr in ((self.ns_a, self.iface_a, self.addr_a),
                                (self.ns_b, self.iface_b, self.addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")

    def popen(self, ns: str, cmd: Sequence[str], env: Mapping[str, str], log: Path,
              cwd: str | Path | None = None) -> subprocess.Popen:
        """Start `cmd` inside namespace `ns` in a session of its own, output to `log`."""
        handle = open(log, "wb")  # noqa: SIM115 - closed at cleanup
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=dict(env), cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc._log_handle = handle  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def pids(self, ns: str) -> list[int]:
        """Processes inside namespace `ns` right now."""
        out = _ip("netns", "pids", ns, check=False).stdout
        return [int(word) for word in out.split() if word.isdigit()]

    def cleanup(self) -> None:
        """Stop every process of the lab and delete its namespaces; safe to call again."""
        if self._closed:
            return
        self._closed = True
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for proc in self._procs:
            handle = getattr(proc, "_log_handle", None)
            if handle is not None:
                handle.close()
        for ns in self._namespaces:
            for pid in self.pids(ns):  # e.g. an etcd whose guard lost its parent
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        atexit.unregister(self.cleanup)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
