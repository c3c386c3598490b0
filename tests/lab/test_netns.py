"""The lab helper itself: it refuses (so the lab tests skip, with the reason) where it
cannot work, and leaves no namespace or process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.netns import LabUnavailable, VethLab, require_netns

pytestmark = pytest.mark.timeout(60)


def test_not_root_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(LabUnavailable, match="needs root"):
        VethLab()


def test_namespaces_and_processes_are_gone_after_a_failure() -> None:
    try:
        require_netns()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    lab = VethLab()
    with pytest.raises(RuntimeError, match="boom"), lab:
        ping = subprocess.run(["ip", "netns", "exec", lab.ns_b, sys.executable, "-c",
                               "import socket; socket.create_connection(('10.77.0.1', 9), 5)"],
                              capture_output=True, text=True, timeout=30)
        assert "refused" in ping.stderr  # B reaches A over the veth pair (nothing on port 9)
        started = lab.popen(lab.ns_a, ["sleep", "600"], {}, Path(os.devnull))
        # started outside `popen`, in a session of its own: only the namespace sweep finds it
        stray = subprocess.Popen(["ip", "netns", "exec", lab.ns_b, "setsid", "sleep", "600"])
        # `ip netns exec` enters the namespace a moment after it starts: wait for both
        deadline = time.monotonic() + 10
        inside: list[int] = []
        while time.monotonic() < deadline:
            inside = lab.pids(lab.ns_a) + lab.pids(lab.ns_b)
            if started.pid in inside and stray.pid in inside:
                break
            time.sleep(0.05)
        assert started.pid in inside and stray.pid in inside
        raise RuntimeError("boom")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.ns_a not in names and lab.ns_b not in names
    assert started.poll() is not None
    assert stray.wait(10) == -9  # SIGKILLed by the sweep
