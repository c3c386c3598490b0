"""Per-node etcd credentials issued by the coordinator (issue 11), over real HTTP.

A `horde-coordinator serve` process holds etcd's root identity for a real etcd with auth
on. A registered node asks for its own etcd user with its node token and can then write
its own keys but not the generation; another node's token cannot get them; asking again
replaces the password (etcd refuses the old one); an eviction revokes them. A
coordinator without an etcd admin identity answers the documented 409 etcd_auth_off.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig
from rendezvous import backend_from_url
from rendezvous.embedded import EmbeddedEtcd, etcd_binary
from rendezvous.errors import RendezvousError, RendezvousPermissionError
from rendezvous.etcd_auth import EtcdCredentials
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.coordinator.helpers import ADMIN_TOKEN
from tests.coordinator.serverproc import ServerProcess
from tests.harness import auth_etcd, unique_job

pytestmark = [pytest.mark.timeout(300)]


def call(url: str, method: str, path: str, body: Any = None,
         token: str | None = None) -> tuple[int, Any]:
    """One real HTTP request; (status, decoded JSON or None)."""
    host, port = url.split("//", 1)[1].split(":")
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return response.status, json.loads(data) if data else None


def register(url: str, node_id: str) -> str:
    status, answer = call(url, "POST", "/api/v1/nodes", {"node_id": node_id})
    assert status == 201, answer
    return answer["token"]


def fetch(url: str, node_id: str, token: str | None) -> tuple[int, Any]:
    path = f"/api/v1/nodes/{urllib.parse.quote(node_id)}/etcd-credentials"
    return call(url, "POST", path, token=token)


@pytest.fixture
def auth_job(tmp_path: Path) -> Iterator[tuple[EmbeddedEtcd, str, ServerProcess]]:
    """A real etcd with auth on for one job and a coordinator holding its root identity."""
    with auth_etcd("coordcreds") as (server, job, root_file):
        workdir = tmp_path / "coordinator"
        workdir.mkdir()
        proc = ServerProcess(f"sqlite:///{workdir / 'ledger.db'}", workdir,
                             f"--rendezvous={server.url}", "--job", job,
                             "--etcd-admin-user", "root",
                             "--etcd-admin-password-file", str(root_file))
        proc.start()
        try:
            yield server, job, proc
        finally:
            proc.stop()


def test_a_node_gets_its_own_etcd_user_and_nobody_else_gets_it(
        auth_job: tuple[EmbeddedEtcd, str, ServerProcess]) -> None:
    server, job, proc = auth_job
    keys = JobKeys(DEFAULT_PREFIX, job)
    token_a, token_b = register(proc.url, "vol-a-0"), register(proc.url, "vol-b-0")

    status, answer = fetch(proc.url, "vol-a-0", token_a)
    assert status == 200, answer
    assert answer["user"] == f"horde-node-{job}-vol-a-0" and answer["job"] == job
    first = EtcdCredentials(answer["user"], answer["password"])
    mine = backend_from_url(server.url, credentials=first)
    mine.put(keys.node("vol-a-0"), b'{"node_id": "vol-a-0"}')
    assert mine.get(keys.node("vol-a-0")) is not None
    with pytest.raises(RendezvousPermissionError):
        mine.put(keys.generation, b"{}")
    with pytest.raises(RendezvousPermissionError):
        mine.put(keys.node("vol-b-0"), b"{}")

    # another node's token, no token, an unknown node, an invalid id
    status, answer = fetch(proc.url, "vol-a-0", token_b)
    assert status == 403 and answer["error"]["code"] == "forbidden"
    status, answer = fetch(proc.url, "vol-a-0", None)
    assert status == 401
    status, answer = fetch(proc.url, "nobody", token_a)
    assert status == 404
    status, answer = fetch(proc.url, "bad id", token_a)
    assert status == 422 and answer["error"]["field"] == "path.node_id"

    # asking again replaces the password: etcd refuses the first one
    status, answer = fetch(proc.url, "vol-a-0", token_a)
    assert status == 200
    second = EtcdCredentials(answer["user"], answer["password"])
    assert second.password != first.password
    with pytest.raises(RendezvousPermissionError):
        backend_from_url(server.url, credentials=first).put(keys.node("vol-a-0"), b"{}")
    backend_from_url(server.url, credentials=second).put(keys.node("vol-a-0"), b"{}")

    # evicting through the coordinator revokes the user, and no new one is issued
    status, answer = call(proc.url, "POST", "/api/v1/evictions",
                          {"node_id": "vol-a-0", "reason": "tests"}, token=ADMIN_TOKEN)
    assert status == 201, answer
    with pytest.raises(RendezvousPermissionError):
        backend_from_url(server.url, credentials=second).put(keys.node("vol-a-0"), b"{}")
    status, answer = fetch(proc.url, "vol-a-0", token_a)
    assert status == 403 and "evicted" in answer["error"]["message"]

    log = proc.log_path.read_text(errors="replace")
    assert first.password not in log and second.password not in log


def test_without_an_etcd_admin_identity_the_answer_says_auth_is_off(
        etcd_server: Any, tmp_path: Path) -> None:
    proc = ServerProcess(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path,
                         f"--rendezvous={etcd_server.url}", "--job", unique_job("noauth"))
    proc.start()
    try:
        token = register(proc.url, "vol-c-0")
        status, answer = fetch(proc.url, "vol-c-0", token)
        assert status == 409
        assert answer["error"]["code"] == "etcd_auth_off"
        assert "without etcd authentication" in answer["error"]["message"]
        status, _ = fetch(proc.url, "vol-c-0", "hrd_not-the-token")
        assert status == 403  # the token is checked first: strangers learn nothing
    finally:
        proc.stop()


def test_an_unreachable_etcd_answers_503(tmp_path: Path) -> None:
    from rendezvous.embedded import free_port

    secret = tmp_path / "root.password"
    secret.write_text("not-a-real-password")
    proc = ServerProcess(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path,
                         f"--rendezvous=etcd://127.0.0.1:{free_port()}",
                         "--etcd-admin-user", "root", "--etcd-admin-password-file",
                         str(secret))
    proc.start()
    try:
        token = register(proc.url, "vol-d-0")
        status, answer = fetch(proc.url, "vol-d-0", token)
        assert status == 503 and answer["error"]["code"] == "unavailable"
    finally:
        proc.stop()


def test_admin_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="go together"):
        CoordinatorConfig(etcd_admin_user="root")
    with pytest.raises(ValueError, match="needs rendezvous_url"):
        CoordinatorConfig(etcd_admin_user="root", etcd_admin_password_file="/x")


def test_an_unreadable_admin_password_file_stops_the_coordinator(tmp_path: Path) -> None:
    from rendezvous.embedded import free_port

    proc = ServerProcess(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path,
                         f"--rendezvous=etcd://127.0.0.1:{free_port()}",
                         "--etcd-admin-user", "root", "--etcd-admin-password-file",
                         str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="etcd admin password file"):
        proc.start()
    proc.stop()


def test_horderun_etcd_auth_embedded_coordinator_issues_node_credentials(
        tmp_path: Path) -> None:
    """`horderun --etcd-auth` gives its embedded coordinator the root identity: a node
    registered there fetches its own etcd user, which writes its own keys only."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from tests.harness import REPO, repo_env

    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")
    job = unique_job("hrcreds")
    env = repo_env(HORDE_TEST_OUT=str(tmp_path), TEST_EPOCHS="1000", TEST_STEP_DELAY="0.2")
    for name in ("HORDE_ETCD_USER", "HORDE_ETCD_PASSWORD", "HORDE_ETCD_PASSWORD_FILE"):
        env.pop(name, None)
    log_path = tmp_path / "horderun.log"
    script = REPO / "tests" / "elastic" / "scripts" / "elastic_worker.py"
    with open(log_path, "wb") as log:
        owner = subprocess.Popen(
            [sys.executable, "-m", "elastic.launcher.cli", "-np", "1", "--etcd-auth",
             "--job", job, "--data-dir", str(tmp_path / "data"), sys.executable, str(script)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        pattern = re.compile(r"status page (http://127\.0\.0\.1:\d+)/")
        while not (pattern.search(log_path.read_text(errors="replace"))
                   and re.search(r"etcd://127\.0\.0\.1:\d+", log_path.read_text())):
            assert owner.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        text = log_path.read_text()
        url = pattern.search(text).group(1)
        etcd_url = re.search(r"etcd://127\.0\.0\.1:\d+", text).group(0)
        token = register(url, "vol-h-0")
        status, answer = fetch(url, "vol-h-0", token)
        assert status == 200, (answer, log_path.read_text())
        keys = JobKeys(DEFAULT_PREFIX, job)
        mine = backend_from_url(etcd_url, credentials=EtcdCredentials(answer["user"],
                                                                      answer["password"]))
        mine.put(keys.ready_node("vol-h-0"), b"{}")
        with pytest.raises(RendezvousPermissionError):
            mine.put(keys.generation, b"{}")
        assert answer["password"] not in log_path.read_text(errors="replace")
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGTERM)
            try:
                owner.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(owner.pid, signal.SIGKILL)
                owner.wait(10)
