"""Host lists (`-H`, `--hostfile`, discovery scripts) reduced to what runs on this machine.

Horde never SSHes into hosts: volunteers connect out. A host list therefore only says
how many slots this machine runs; other hosts join with `horderun --join`.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class HostSlots:
    host: str
    slots: int


def is_local(host: str) -> bool:
    names = LOCAL_NAMES | {socket.gethostname(), socket.getfqdn()}
    return host in names


def parse_hosts(text: str, default_slots: int = 1) -> list[HostSlots]:
    """Parse `host1:2,host2:4` (slots default to `default_slots`)."""
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, slots = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            count = int(slots) if slots else default_slots
        except ValueError:
            raise ValueError(f"host entry {item!r} must look like HOST or HOST:SLOTS") from None
        if count < 1:
            raise ValueError(f"host entry {item!r} has {count} slots; it needs at least 1")
        hosts.append(HostSlots(name or item, count))
    if not hosts:
        raise ValueError(f"no hosts found in {text!r}; expected HOST:SLOTS[,HOST:SLOTS...]")
    return hosts


def parse_hostfile(path: str, default_slots: int = 1) -> list[HostSlots]:
    """Parse a hostfile: one `HOST slots=N` (or `HOST:N`) per line, `#` comments."""
    hosts = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read hostfile {path!r}: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith("slots="):
            try:
                hosts.append(HostSlots(parts[0], int(parts[1][6:])))
            except ValueError:
                raise ValueError(f"{path}:{number}: bad slots in {line!r}") from None
        elif len(parts) == 1:
            hosts.extend(parse_hosts(parts[0], default_slots))
        else:
            raise ValueError(f"{path}:{number}: expected 'HOST slots=N' or 'HOST:N', got {line!r}")
    return hosts


def discover(script: str, default_slots: int, timeout: float = 30.0) -> list[HostSlots]:
    """Run a Horovod-style discovery script: it prints one `HOST[:SLOTS]` per line."""
    try:
        out = subprocess.run([script], capture_output=True, text=True, timeout=timeout,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ValueError(f"host discovery script {script!r} failed: {exc}") from exc
    hosts: list[HostSlots] = []
    for line in out.splitlines():
        if line.strip():
            hosts.extend(parse_hosts(line.strip(), default_slots))
    return hosts


def local_slots(hosts: list[HostSlots]) -> tuple[int, list[str]]:
    """Slots on this machine, and the remote hosts that must join by themselves."""
    local = sum(h.slots for h in hosts if is_local(h.host))
    remote = [h.host for h in hosts if not is_local(h.host)]
    return local, remote
