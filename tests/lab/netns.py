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


def require_nft() -> None:
    """Raise LabUnavailable unless `nft` (nftables) is installed, besides `require_netns`."""
    require_netns()
    if shutil.which("nft") is None:
        raise LabUnavailable("the NAT lab builds its routers with nftables; install it "
                             "(apt-get install nftables)")


class NatLab(VethLab):
    """A public namespace and two homes, each behind a NAT router of its own.

        pub 10.78.1.1 --- 10.78.1.2 [r1, masquerade] 192.168.1.1 --- 192.168.1.2 home1
        pub 10.78.2.1 --- 10.78.2.2 [r2, masquerade] 192.168.2.1 --- 192.168.2.2 home2

    Each router forwards from its home outwards and drops every forwarded packet that does
    not belong to a connection the home opened (nftables: forward policy drop, accept
    established/related), as a home router does; the public side has no route into the
    homes at all. Cleanup as `VethLab`.
    """

    def __init__(self) -> None:
        require_nft()
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        base = f"horde-nat-{tag}"
        self.ns_pub = f"{base}-pub"
        self.routers = [f"{base}-r1", f"{base}-r2"]
        self.homes = [f"{base}-h1", f"{base}-h2"]
        self.pub_addr = "10.78.1.1"
        self.home_addrs = ["192.168.1.2", "192.168.2.2"]
        self.router_wan = ["10.78.1.2", "10.78.2.2"]
        self._tag = tag
        self._namespaces = []
        self._procs = []
        self._closed = False
        # VethLab's names, so that its helpers keep working
        self.ns_a, self.ns_b = self.ns_pub, self.homes[0]

    def _create(self) -> None:
        for ns in [self.ns_pub, *self.routers, *self.homes]:
            _ip("netns", "add", ns)
            self._namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, (router, home) in enumerate(zip(self.routers, self.homes), start=1):
            wan_pub, wan_r = f"hn{self._tag}w{i}", f"hn{self._tag}x{i}"
            lan_r, lan_h = f"hn{self._tag}l{i}", f"hn{self._tag}h{i}"
            self._veth(self.ns_pub, wan_pub, f"10.78.{i}.1/24", router, wan_r, f"10.78.{i}.2/24")
            self._veth(router, lan_r, f"192.168.{i}.1/24", home, lan_h, f"192.168.{i}.2/24")
            _ip("-n", home, "route", "add", "default", "via", f"192.168.{i}.1")
            _ip("-n", router, "route", "add", "default", "via", f"10.78.{i}.1")
            _run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            rules = (
                "table ip nat {\n chain outbound {\n  type nat hook postrouting priority srcnat;\n"
                f"  oifname \"{wan_r}\" masquerade\n }}\n}}\n"
                "table inet filter {\n chain forwarding {\n  type filter hook forward priority 0; "
                "policy drop;\n  ct state established,related accept\n"
                f"  iifname \"{lan_r}\" oifname \"{wan_r}\" accept\n }}\n}}\n")
            _run(["ip", "netns", "exec", router, "nft", "-f", "-"], stdin=rules)

    def _veth(self, ns1: str, if1: str, addr1: str, ns2: str, if2: str, addr2: str) -> None:
        _ip("-n", ns1, "link", "add", if1, "type", "veth", "peer", "name", if2, "netns", ns2)
        for ns, iface, addr in ((ns1, if1, addr1), (ns2, if2, addr2)):
            _ip("-n", ns, "addr", "add", addr, "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")

    def links(self) -> list[tuple[str, str]]:
        """(namespace, interface) of every link end, e.g. to shape them with `tc`."""
        out = []
        for ns in self._namespaces:
            text = _ip("-n", ns, "-o", "link", "show", check=False).stdout
            for line in text.splitlines():
                name = line.split(":")[1].strip().split("@")[0]
                if name != "lo":
                    out.append((ns, name))
        return out


def _run(cmd: Sequence[str], stdin: str | None = None) -> None:
    result = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LabUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")
