"""The embedded etcd lives exactly as long as the process that started it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from rendezvous.embedded import _GUARD, EmbeddedEtcd
from rendezvous.etcd import EtcdBackend
from tests.harness import REPO, repo_env

pytestmark = pytest.mark.timeout(90)


def test_etcd_started_from_a_thread_outlives_the_thread() -> None:
    """The owner is the process, not the thread (PR_SET_PDEATHSIG would get this wrong)."""
    box: list[EmbeddedEtcd] = []
    starter = threading.Thread(target=lambda: box.append(EmbeddedEtcd()))
    starter.start()
    starter.join(60)
    server = box[0]
    try:
        time.sleep(0.5)  # several of the guard's looks at its owner
        backend = EtcdBackend.from_url(server.url)
        backend.put("/alive", b"yes")
        assert backend.get("/alive").value == b"yes"  # type: ignore[union-attr]
        backend.close()
    finally:
        server.stop()
    assert not server.data_dir.exists()


def test_guard_of_an_owner_that_is_already_gone_cleans_up_at_once(tmp_path: Path) -> None:
    data = tmp_path / "etcd-data"
    data.mkdir()
    # Owner pid 1 is not the guard's parent: as if the owner died before the guard ran.
    result = subprocess.run([sys.executable, "-I", "-S", str(_GUARD), "1", str(data), "--",
                             "/no/such/etcd"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert not data.exists()


def test_sigkill_of_the_owner_stops_etcd_and_removes_its_data() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rendezvous.embedded import EmbeddedEtcd\n"
         "e = EmbeddedEtcd()\nprint(e.data_dir, flush=True)\ntime.sleep(120)"],
        env=repo_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    leftovers: list[psutil.Process] = []
    try:
        data_dir = Path(owner.stdout.readline().strip())  # type: ignore[union-attr]
        guard = psutil.Process(owner.pid).children()[0]
        etcd = guard.children()[0]
        leftovers += [guard, etcd]
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (data_dir.exists() or etcd.is_running()):
            time.sleep(0.05)
        assert not etcd.is_running() or etcd.status() == psutil.STATUS_ZOMBIE
        assert not data_dir.exists()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for proc in leftovers:  # only if the test failed: never leave etcd running
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
