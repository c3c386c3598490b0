"""An emulated network on one machine: one network namespace per worker, joined by veth
pairs to a bridge in the root namespace, each link optionally shaped with `tbf`.

    lab = NetLab(workers=4, tag="hl")      # checks root, ip and tc; nothing created yet
    with lab:                               # creates; removes everything on exit
        lab.shape(100)                      # tbf 100 Mbit/s on both ends of every veth
        proc = lab.popen(0, ["horderun", ...])
        ...

Layout for tag `hl` (names stay under the 15 characters Linux allows):

    root namespace: bridge hzhl<id>b, address <subnet>.1/24 (etcd listens here)
    worker i:       namespace hzhl<id>-<i>, interface hzhl<id>n<i> (<subnet>.<11+i>),
                    its peer hzhl<id>h<i> enslaved to the bridge

`tbf` shapes egress only, so a link is shaped at both ends: the namespace side (what the
worker uploads) and the bridge side (what it downloads). netem is not needed.

Cleanup is idempotent and runs on `__exit__`, at interpreter exit (atexit) and on
SIGINT/SIGTERM/SIGHUP (the handlers raise `SystemExit` so `finally` blocks run): the
processes started through `popen` (their process groups) and any process still inside
one of the lab's namespaces are killed by pid, then the namespaces, veths and the
bridge are deleted. Only objects this lab created are touched.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

#: Seconds a started process group gets between SIGTERM and SIGKILL at cleanup.
STOP_GRACE = 5.0


class LabUnavailable(RuntimeError):
    """The machine cannot host the lab (not root, no `ip`/`tc`, no namespaces)."""


def require_lab_tools() -> None:
    """Raise LabUnavailable with a clear sentence unless root with `ip` and `tc`."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise LabUnavailable("network namespaces need Linux; this is " + sys.platform)
    if os.geteuid() != 0:
        raise LabUnavailable(
            "this benchmark creates network namespaces, veth pairs, a bridge and tc qdiscs, "
            "which needs root (euid 0); run it as root, e.g. with sudo -E")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise LabUnavailable(f"missing {' and '.join(missing)} (package iproute2); install "
                             "it to run this benchmark")


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise LabUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")
    return result


def _taken_subnets() -> set[str]:
    out = _run(["ip", "-j", "-4", "addr", "show"], check=False).stdout or "[]"
    taken = set()
    for link in json.loads(out):
        for addr in link.get("addr_info", []):
            taken.add(".".join(addr.get("local", "0.0.0.0").split(".")[:3]))
    return taken


class NetLab:
    """Namespaces, veths, a bridge and tbf qdiscs for `workers` workers; see module doc."""

    def __init__(self, workers: int, tag: str) -> None:
        require_lab_tools()
        if not (1 <= workers <= 200):
            raise ValueError(f"workers={workers} must be in 1..200")
        self.workers = workers
        ident = os.getpid() % 10000
        self.prefix = f"hz{tag[:2]}{ident}"
        self.bridge = f"{self.prefix}b"
        self.subnet = ""
        self.rate_mbit: float | None = None
        self._created: list[tuple[str, str]] = []  # ("ns"|"link", name), in creation order
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self._old_handlers: dict[int, object] = {}

    # -- names ------------------------------------------------------------------------

    def namespace(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    def iface(self, i: int) -> str:
        """The worker-side interface (inside namespace i)."""
        return f"{self.prefix}n{i}"

    def host_iface(self, i: int) -> str:
        """The bridge-side interface of worker i (root namespace)."""
        return f"{self.prefix}h{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{11 + i}"

    @property
    def bridge_address(self) -> str:
        return f"{self.subnet}.1"

    # -- life cycle -------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        atexit.register(self.cleanup)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._create()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def _create(self) -> None:
        taken = _taken_subnets()
        free = [f"10.231.{x}" for x in range(1, 255) if f"10.231.{x}" not in taken]
        if not free:
            raise LabUnavailable("no free 10.231.X.0/24 subnet for the lab's bridge")
        self.subnet = free[(os.getpid() // 7) % len(free)]
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._created.append(("link", self.bridge))
        _run(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i in range(self.workers):
            ns, inner, outer = self.namespace(i), self.iface(i), self.host_iface(i)
            _run(["ip", "netns", "add", ns])
            self._created.append(("ns", ns))
            _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
            self._created.append(("link", outer))
            _run(["ip", "link", "set", inner, "netns", ns])
            _run(["ip", "link", "set", outer, "master", self.bridge])
            _run(["ip", "link", "set", outer, "up"])
            in_ns = ["ip", "netns", "exec", ns]
            _run([*in_ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", inner])
            _run([*in_ns, "ip", "link", "set", inner, "up"])
            _run([*in_ns, "ip", "link", "set", "lo", "up"])
            # No IPv6 chatter (router solicitations, DAD) in the byte counters.
            _run([*in_ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
                 check=False)
        self._wait_connected()

    def _wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until every namespace reaches the bridge address (bridge ports forwarding)."""
        probe = ("import socket,sys\ns=socket.socket()\ns.settimeout(0.5)\n"
                 "r=s.connect_ex((sys.argv[1], 9))\nsys.exit(0 if r in (0,111) else 1)")
        deadline = time.monotonic() + timeout
        for i in range(self.workers):
            while True:
                ok = _run(["ip", "netns", "exec", self.namespace(i), sys.executable, "-c",
                           probe, self.bridge_address], check=False).returncode == 0
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise LabUnavailable(f"namespace {self.namespace(i)} cannot reach the "
                                         f"bridge at {self.bridge_address}")
                time.sleep(0.2)

    def shape(self, rate_mbit: float | None, latency_ms: float = 50.0) -> None:
        """Limit every link to `rate_mbit` Mbit/s in both directions (None: unlimited).

        tbf on both ends of each veth; the bucket holds 10 ms at the rate (at least 16 KB,
        more than one GSO segment is split by tbf itself); `latency_ms` bounds the queue.
        """
        self.rate_mbit = rate_mbit
        for i in range(self.workers):
            for ns, dev in ((self.namespace(i), self.iface(i)), (None, self.host_iface(i))):
                prefix = ["ip", "netns", "exec", ns] if ns else []
                if rate_mbit is None:
                    _run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
                    continue
                burst = max(16 * 1024, int(rate_mbit * 1e6 / 8 * 0.010))
                _run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                      "rate", f"{rate_mbit:g}mbit", "burst", str(burst),
                      "latency", f"{latency_ms:g}ms"])

    def qdiscs(self) -> str:
        """`tc qdisc show` of every lab link (for the log)."""
        lines = []
        for i in range(self.workers):
            lines.append(_run(["ip", "netns", "exec", self.namespace(i), "tc", "qdisc", "show",
                               "dev", self.iface(i)], check=False).stdout.strip())
            lines.append(_run(["tc", "qdisc", "show", "dev", self.host_iface(i)],
                              check=False).stdout.strip())
        return "\n".join(lines)

    def counters(self, i: int) -> dict[str, int]:
        """tx/rx bytes of worker i's interface (its side of the veth)."""
        out = _run(["ip", "netns", "exec", self.namespace(i), "cat",
                    f"/sys/class/net/{self.iface(i)}/statistics/tx_bytes",
                    f"/sys/class/net/{self.iface(i)}/statistics/rx_bytes"]).stdout.split()
        return {"tx_bytes": int(out[0]), "rx_bytes": int(out[1])}

    def popen(self, i: int, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        """Start `cmd` inside namespace i in a new process group, output to `log`."""
        handle = open(log, "wb")  # noqa: SIM115 - closed at cleanup
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(i), *cmd], env=env,
                                cwd=cwd, stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc._lab_log = handle  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def stop_processes(self) -> None:
        """Stop what `popen` started (SIGTERM, then SIGKILL), then anything left in the
        lab's namespaces (by pid, from `ip netns pids`)."""
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc._lab_log.close()  # type: ignore[attr-defined]
        self._procs = [p for p in self._procs if p.poll() is None]
        for kind, name in self._created:
            if kind != "ns":
                continue
            pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def cleanup(self) -> None:
        """Remove everything the lab created (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_processes()
        finally:
            for kind, name in reversed(self._created):
                if kind == "ns":
                    _run(["ip", "netns", "del", name], check=False)
                else:
                    _run(["ip", "link", "del", name], check=False)
            self._created.clear()
            for sig, handler in self._old_handlers.items():
                with contextlib.suppress(Exception):
                    signal.signal(sig, handler)  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                atexit.unregister(self.cleanup)


def leftovers(prefix: str = "hz") -> list[str]:
    """Names of namespaces and links that look like a lab's (for diagnostics)."""
    found = [line.split()[0] for line in
             _run(["ip", "netns", "list"], check=False).stdout.splitlines()
             if line.startswith(prefix)]
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1 and parts[1].strip().split("@")[0].startswith(prefix):
            found.append(parts[1].strip().split("@")[0])
    return found
