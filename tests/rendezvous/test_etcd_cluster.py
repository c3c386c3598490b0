"""The etcd backend on a real three-member cluster: failover between members, leases and
watch positions that survive it, quorum loss and its return, and lost answers."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import requests

from rendezvous import EtcdBackend, RendezvousConnectionError, backend_from_url
from rendezvous.embedded import free_port
from rendezvous.etcd import parse_endpoints
from rendezvous.local_cluster import LocalEtcdCluster
from tests.harness import REPO, horderun, repo_env

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")

# -- URLs ------------------------------------------------------------------------------


def test_url_with_several_members() -> None:
    backend = EtcdBackend.from_url("etcd://h1:2379,h2:12379,[::1]:2379/")
    assert [(e.host, e.port) for e in backend.endpoints] == [
        ("h1", 2379), ("h2", 12379), ("::1", 2379)]
    assert backend.url == "etcd://h1:2379,h2:12379,[::1]:2379"
    assert (backend.host, backend.port) == ("h1", 2379)  # the first is preferred
    assert isinstance(backend_from_url("http://a:1,b:2"), EtcdBackend)


@pytest.mark.parametrize("url", [
    "etcd://h1:2379,", "etcd://h1:2379,,h2:2379", "etcd://h1:2379,h2", "etcd://h1:2379/,h2:1",
    "etcd://h1:2379,etcd://h2:2379", "etcd://h1:2379,h2:99999", "etcd://u@h1:2379",
])
def test_bad_member_lists_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="etcd://HOST1:PORT1,HOST2:PORT2") as info:
        parse_endpoints(url)
    assert repr(url) in str(info.value)


def test_a_member_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="lists h1:2379 twice"):
        parse_endpoints("etcd://h1:2379,h2:2379,h1:2379")


# -- failover on a real cluster ------------------------------------------------------


def _retry(call: Callable[[], T], timeout: float = 20.0) -> T:
    """`call()` until the cluster answers (a new raft leader may take a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except RendezvousConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _backend(cluster: LocalEtcdCluster) -> EtcdBackend:
    return EtcdBackend.from_url(cluster.url, timeout=1.0)


def test_killed_member_fails_over_and_keeps_lease_and_watch(
        etcd_cluster: LocalEtcdCluster, key_prefix: str) -> None:
    backend = _backend(etcd_cluster)
    other = EtcdBackend.from_url(etcd_cluster.member_url(2), timeout=2.0)
    lease = backend.grant_lease(2)
    backend.put(key_prefix + "node", b"up", lease=lease)
    seen = backend.put(key_prefix + "a", b"1")
    assert backend.endpoint.port == etcd_cluster.members[0].client_port

    etcd_cluster.kill(0)
    changed = _retry(lambda: other.put(key_prefix + "b", b"2"))  # made while we fail over
    etcd_cluster.wait_healthy([1, 2])  # a new raft leader, if m0 was it
    # The watch resumes from `seen + 1` on another member: the change is not missed.
    assert backend.wait_for_change(key_prefix, seen, 5.0) is True
    assert backend.endpoint.port != etcd_cluster.members[0].client_port
    assert backend.failovers == 1
    # ...and once seen, nothing more is reported (no false wake-up from the new member).
    start = time.monotonic()
    assert backend.wait_for_change(key_prefix, changed, 0.5) is False
    assert time.monotonic() - start >= 0.4
    # The lease lives in the cluster: kept alive through another member for 3 TTLs.
    for _ in range(6):
        assert backend.refresh_lease(lease) is True
        time.sleep(1.0)
    kv = backend.get(key_prefix + "node")
    assert kv is not None and kv.lease == lease
    assert backend.compare_and_swap(key_prefix + "a", seen, b"3") is True

    etcd_cluster.start(0)
    etcd_cluster.wait_healthy([0])
    assert EtcdBackend.from_url(etcd_cluster.member_url(0)).get(key_prefix + "a").value == b"3"
    backend.close()
    other.close()


def test_quorum_loss_is_named_and_the_cluster_comes_back(
        etcd_cluster: LocalEtcdCluster, key_prefix: str) -> None:
    backend = _backend(etcd_cluster)
    lease = backend.grant_lease(3)
    backend.put(key_prefix + "node", b"up", lease=lease)
    etcd_cluster.stop(1)
    etcd_cluster.stop(2)
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as info:
        backend.get(key_prefix + "node")
    message = str(info.value)
    assert "any of its 3 members" in message and "majority (2 of 3)" in message
    for member in etcd_cluster.members:
        assert f"127.0.0.1:{member.client_port}" in message
    assert "connection refused" in message
    assert time.monotonic() - start < 10.0  # one timeout on the member left, not more
    time.sleep(4.0)  # longer than the lease TTL: without a leader, no lease expires
    etcd_cluster.start(1)
    etcd_cluster.start(2)
    deadline = time.monotonic() + 30
    while True:
        try:
            kv = backend.get(key_prefix + "node")
            break
        except RendezvousConnectionError:
            assert time.monotonic() < deadline, "the cluster did not come back"
            time.sleep(0.2)
    assert kv is not None and kv.value == b"up"
    assert backend.refresh_lease(lease) is True
    backend.close()


# -- an answer lost after the write was applied ---------------------------------------


class _AppliesThenFails(http.server.BaseHTTPRequestHandler):
    """Forwards each request to a real member, then answers 503 as if the member had
    died after applying it: the client cannot tell whether its write happened."""

    target = ""

    def do_GET(self) -> None:
        answer = requests.get(self.target + self.path, timeout=5)
        self._send(answer.status_code, answer.content)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        requests.post(self.target + self.path, data=body, timeout=5)
        self._send(503, b'{"error":"etcdserver: request timed out","code":14}')

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass


@pytest.fixture
def lossy_member(etcd_cluster: LocalEtcdCluster) -> Iterator[int]:
    handler = type("Handler", (_AppliesThenFails,), {
        "target": f"http://127.0.0.1:{etcd_cluster.members[0].client_port}"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_compare_and_swap_whose_answer_was_lost_is_settled_by_reading_back(
        etcd_cluster: LocalEtcdCluster, lossy_member: int, key_prefix: str) -> None:
    real = etcd_cluster.members[1].client_port
    backend = EtcdBackend.from_url(f"etcd://127.0.0.1:{lossy_member},127.0.0.1:{real}",
                                   timeout=2.0)
    key = key_prefix + "leader"
    lease = EtcdBackend.from_url(etcd_cluster.member_url(1)).grant_lease(10)
    # Applied through the lossy member, refused on retry (the key exists by then): won.
    assert backend.compare_and_swap(key, 0, b"me", lease=lease) is True
    assert backend.failovers == 1
    # A CAS that really lost stays lost, even after a failover.
    backend._preferred = 0  # noqa: SLF001 - send the next request to the lossy member
    direct = EtcdBackend.from_url(etcd_cluster.member_url(1))
    direct.put(key_prefix + "gen", b"theirs")
    assert backend.compare_and_swap(key_prefix + "gen", 0, b"mine") is False
    assert direct.get(key_prefix + "gen").value == b"theirs"
    backend.close()
    direct.close()


# -- the commands say where they connect ----------------------------------------------


@pytest.mark.parametrize("url", ["etcd://127.0.0.1:2379,127.0.0.1", "etcd://a:1,,b:2"])
def test_horderun_refuses_a_bad_member_list(url: str) -> None:
    result = horderun("-np", "1", "--rendezvous", url, sys.executable, "-c", "pass")
    assert result.returncode == 2, result.stderr
    assert "etcd://HOST1:PORT1,HOST2:PORT2" in result.stderr


def test_unreachable_cluster_is_named_by_horderun() -> None:
    ports = [free_port() for _ in range(3)]
    url = "etcd://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    result = horderun("-np", "1", "--rendezvous", url, sys.executable, "-c", "pass",
                      env=repo_env(HORDE_RENDEZVOUS=""), timeout=60)
    assert result.returncode == 1
    assert "cannot reach etcd at any of its 3 members" in result.stderr
    assert "majority (2 of 3)" in result.stderr


def test_coordinator_names_the_member_it_uses(etcd_cluster: LocalEtcdCluster,
                                              tmp_path: Path) -> None:
    etcd_cluster.kill(0)
    etcd_cluster.wait_healthy([1, 2])
    port_file = tmp_path / "port"
    log = tmp_path / "coordinator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "--log-level", "INFO", "serve",
             "--db", f"sqlite:///{tmp_path / 'ledger.db'}", "--port", "0",
             "--port-file", str(port_file), "--rendezvous", etcd_cluster.url],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=repo_env())
    try:
        deadline = time.monotonic() + 60
        while "serving at" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        live = etcd_cluster.members[1].client_port
        assert f"using member 127.0.0.1:{live}" in text, text
        assert "ledger: Storage('sqlite:///" in text
    finally:
        proc.terminate()
        proc.wait(15)
