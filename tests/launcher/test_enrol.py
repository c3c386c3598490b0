"""`horderun --join`'s enrolment (elastic/launcher/enrol.py) against a real coordinator
over HTTP and a real etcd: the node's own etcd user, none where the job runs without
etcd auth, and clear errors when the coordinator refuses or cannot be reached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from elastic.launcher.enrol import EnrolmentError, enrol
from rendezvous import backend_from_url
from rendezvous.embedded import EmbeddedEtcd, free_port
from rendezvous.errors import RendezvousPermissionError
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.coordinator.serverproc import ServerProcess
from tests.harness import unique_job
from tests.security.test_coordinator_etcd_credentials import auth_job  # noqa: F401 - fixture

pytestmark = [pytest.mark.timeout(300)]


def test_a_joining_node_gets_its_own_etcd_user(
        auth_job: tuple[EmbeddedEtcd, str, ServerProcess]) -> None:  # noqa: F811
    server, job, proc = auth_job
    keys = JobKeys(DEFAULT_PREFIX, job)
    enrolled = enrol(proc.url, "joiner-1-0")
    assert enrolled.etcd is not None and enrolled.etcd.user == f"horde-node-{job}-joiner-1-0"
    assert enrolled.token.startswith("hrd_")
    mine = backend_from_url(server.url, credentials=enrolled.etcd)
    mine.put(keys.node("joiner-1-0"), b"{}")  # its own key
    with pytest.raises(RendezvousPermissionError):
        mine.put(keys.generation, b"{}")
    # the same node id again: the coordinator keeps the first registration's token
    with pytest.raises(EnrolmentError, match="refused to register node joiner-1-0"):
        enrol(proc.url, "joiner-1-0")
    assert enrolled.etcd.password not in proc.log_path.read_text(errors="replace")


def test_without_etcd_auth_the_node_joins_without_credentials(
        etcd_server: Any, tmp_path: Path) -> None:
    proc = ServerProcess(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path,
                         f"--rendezvous={etcd_server.url}", "--job", unique_job("enrol"))
    proc.start()
    try:
        enrolled = enrol(proc.url, "joiner-2-0")
        assert enrolled.etcd is None and enrolled.token
    finally:
        proc.stop()


def test_an_unreachable_coordinator_is_named_after_the_deadline() -> None:
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    with pytest.raises(EnrolmentError, match=f"cannot reach the job's coordinator at {url}"):
        enrol(url, "joiner-3-0", deadline_s=1.0)
