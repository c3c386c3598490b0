"""Host lists reduce to this machine's slots; other hosts are told to join."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from elastic.launcher.hosts import discover, local_slots, parse_hostfile, parse_hosts


def test_parse_hosts_with_and_without_slots() -> None:
    hosts = parse_hosts("localhost:2,gpu-box,other:4", default_slots=1)
    assert [(h.host, h.slots) for h in hosts] == [("localhost", 2), ("gpu-box", 1), ("other", 4)]


@pytest.mark.parametrize("bad", ["host:x", "host:0", ",,"])
def test_parse_hosts_rejects_bad_entries(bad: str) -> None:
    with pytest.raises(ValueError, match="host"):
        parse_hosts(bad)


def test_hostfile(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(f"# comment\nlocalhost slots=2\n{socket.gethostname()}:1\nremote slots=4\n")
    hosts = parse_hostfile(str(path))
    local, remote = local_slots(hosts)
    assert local == 3 and remote == ["remote"]


def test_hostfile_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("localhost slots=two\n")
    with pytest.raises(ValueError, match=r"hosts:1"):
        parse_hostfile(str(path))
    with pytest.raises(ValueError, match="cannot read hostfile"):
        parse_hostfile(str(tmp_path / "missing"))


def test_discovery_script(tmp_path: Path) -> None:
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho localhost:2\necho far-away:8\n")
    script.chmod(0o755)
    local, remote = local_slots(discover(str(script), default_slots=1))
    assert local == 2 and remote == ["far-away"]
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(ValueError, match="discovery script"):
        discover(str(broken), 1)
