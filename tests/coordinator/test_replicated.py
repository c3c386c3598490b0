"""Two coordinators over one real PostgreSQL ingest the same job at once; one is SIGKILLed
(and later restarted) while workers report through the failover client.

Workers send each batch through `CoordinatorClient` (both URLs, half of them preferring
each coordinator), and a third of the batches a second time, at the same moment, to the
other coordinator: the same report reaches both servers concurrently. The ledger must
hold every acknowledged report, nothing never sent, and credit equal to the credit
computed independently from the stored reports: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import http.server
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, select, text

from coordinator.server import EmbeddedCoordinator
from coordinator.storage.models import nodes, reports
from elastic.coordinator_client import CoordinatorClient
from elastic.credit.reporter import CreditReporter
from rendezvous.embedded import free_port
from tests.coordinator.helpers import JOB, auth, make_config, report
from tests.coordinator.serverproc import ServerProcess
from tests.coordinator.test_crash import MEMBERS, expected_credit, samples_of
from tests.coordinator.test_postgres import postgres_url  # noqa: F401 - the fixture
from tests.credits.test_worker_credit import SCRIPT as CREDIT_WORKER
from tests.credits.test_worker_credit import own_samples
from tests.harness import REPO, repo_env

ROUNDS = 600
BATCH = 12
DEADLINE = 120.0


def db_state(db_url: str) -> tuple[set[tuple[str, int]], dict[str, int]]:
    """Stored reports and node totals from ONE snapshot (REPEATABLE READ): the other
    coordinator goes on writing while this reads."""
    engine = create_engine(db_url, isolation_level="REPEATABLE READ")
    try:
        with engine.connect() as conn, conn.begin():
            stored = {(r.reporter, int(r.round)) for r in conn.execute(
                select(reports.c.reporter, reports.c.round).where(reports.c.job == JOB))}
            ledger = {r.node_id: int(r.credit_total) for r in conn.execute(select(nodes))}
    finally:
        engine.dispose()
    return stored, ledger


class Reporter(threading.Thread):
    """One node: every batch through the failover client until acknowledged; some batches
    also straight to the other coordinator at the same time (a concurrent duplicate)."""

    def __init__(self, node: str, token: str, urls: list[str], log: dict) -> None:
        super().__init__(daemon=True, name=f"reporter-{node}")
        self.node, self.token, self.log = node, token, log
        self.client = CoordinatorClient(urls)
        self.other = urls[1]
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test
            self.error = exc

    def _duplicate(self, body: dict) -> None:
        try:
            requests.post(self.other + "/api/v1/reports", json=body, headers=auth(self.token),
                          timeout=10)
        except requests.RequestException:
            pass  # that coordinator may be the one that was killed

    def _run(self) -> None:
        rounds = list(range(ROUNDS))
        random.Random(self.node).shuffle(rounds)
        for index, start in enumerate(range(0, ROUNDS, BATCH)):
            chunk = rounds[start:start + BATCH]
            body = {"node_id": self.node, "reports": [
                report(r, MEMBERS, {m: samples_of(m, r) for m in MEMBERS}) for r in chunk]}
            keys = {(self.node, r) for r in chunk}
            twin = None
            if index % 3 == 0:
                twin = threading.Thread(target=self._duplicate, args=(body,), daemon=True)
                with self.log["lock"]:
                    self.log["sent"] |= keys
                twin.start()
            while True:
                assert time.monotonic() < self.log["deadline"], f"{self.node}: stuck at {start}"
                with self.log["lock"]:
                    self.log["sent"] |= keys
                try:
                    response = self.client.post("/api/v1/reports", json=body,
                                                headers=auth(self.token), timeout=10)
                except requests.RequestException:
                    time.sleep(0.1)  # both away for a moment: resend
                    continue
                if response.status_code >= 500:
                    time.sleep(0.1)
                    continue
                assert response.status_code == 200, response.text
                assert response.json()["rejected"] == 0, response.text
                with self.log["lock"]:
                    self.log["acked"] |= keys
                    self.log["batches"] += 1
                break
            if twin is not None:
                twin.join(15)


def _fresh_schema(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.mark.timeout(240)
def test_two_coordinators_one_killed_ledger_equals_accepted_contributions(
        postgres_url: str, tmp_path: Path) -> None:  # noqa: F811 - the imported fixture
    _fresh_schema(postgres_url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = ServerProcess(postgres_url, tmp_path / "a", "--threads", "4")
    second = ServerProcess(postgres_url, tmp_path / "b", "--threads", "4")
    log = {"lock": threading.Lock(), "sent": set(), "acked": set(), "batches": 0,
           "deadline": time.monotonic() + DEADLINE}
    try:
        # Both start at once on the empty database: they migrate it one after the other.
        starting = threading.Thread(target=second.start, daemon=True)
        starting.start()
        first.start()
        starting.join(60)
        assert second.url, second.log_path.read_text()
        tokens = {}
        for i, node in enumerate(MEMBERS):
            url = (first, second)[i % 2].url  # registered on either, valid on both
            response = requests.post(url + "/api/v1/nodes", json={"node_id": node}, timeout=10)
            assert response.status_code == 201, response.text
            tokens[node] = response.json()["token"]
        urls = {0: [first.url, second.url], 1: [second.url, first.url]}
        reporters = [Reporter(n, tokens[n], urls[i % 2], log) for i, n in enumerate(MEMBERS)]
        for r in reporters:
            r.start()
        total = len(MEMBERS) * -(-ROUNDS // BATCH)
        while log["batches"] < 0.35 * total:
            assert time.monotonic() < log["deadline"], "reporters stalled"
            time.sleep(0.005)
        first.kill()
        killed_url = first.url
        with log["lock"]:
            acked, sent = set(log["acked"]), set(log["sent"])
        stored, ledger = db_state(postgres_url)
        assert acked <= stored, f"lost {len(acked - stored)} acknowledged reports"
        assert stored <= sent, "stored reports that were never sent"
        assert ledger == expected_credit(stored)
        # The survivor takes every reporter; then the killed one comes back (same port is
        # not promised: reporters keep using the survivor, which is the point).
        while log["batches"] < 0.7 * total:
            assert time.monotonic() < log["deadline"], "reporters stalled after the kill"
            time.sleep(0.005)
        first.start()
        for r in reporters:
            r.join(DEADLINE)
            assert not r.is_alive(), f"{r.name} did not finish"
            assert r.error is None, r.error
        assert any(r.client.failovers for r in reporters), "no reporter failed over"
        assert all(r.client.url != killed_url for r in reporters)
        every = {(n, r) for n in MEMBERS for r in range(ROUNDS)}
        truth = expected_credit(every)
        for server in (first, second):
            for node in MEMBERS:
                response = requests.get(f"{server.url}/api/v1/nodes/{node}", timeout=10)
                assert response.json()["credit"] == truth[node]
        stored, ledger = db_state(postgres_url)
        assert stored == every and ledger == truth
        for server in (first, second):
            assert "Traceback" not in server.log_path.read_text(), server.log_path.read_text()
    finally:
        first.stop()
        second.stop()


# -- registration and the client, on two coordinators of one SQLite ledger ----------------


def test_registration_with_own_token_can_be_retried_on_the_other_coordinator(
        tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with EmbeddedCoordinator(config) as one, EmbeddedCoordinator(config) as two:
        token = "hrd_" + "x" * 43
        body = {"node_id": "n1", "token": token}
        first = requests.post(one.url + "/api/v1/nodes", json=body, timeout=10)
        assert first.status_code == 201 and first.json()["token"] == token
        again = requests.post(two.url + "/api/v1/nodes", json=body, timeout=10)
        assert again.status_code == 201 and again.json()["token"] == token
        other = requests.post(two.url + "/api/v1/nodes",
                              json={"node_id": "n1", "token": "hrd_" + "y" * 43}, timeout=10)
        assert other.status_code == 409
        plain = requests.post(two.url + "/api/v1/nodes", json={"node_id": "n1"}, timeout=10)
        assert plain.status_code == 409
        weak = requests.post(one.url + "/api/v1/nodes",
                             json={"node_id": "n2", "token": "hrd_short"}, timeout=10)
        assert weak.status_code == 422 and "token" in weak.text
        response = requests.get(two.url + "/api/v1/nodes/n1", timeout=10)
        assert response.status_code == 200


def test_client_fails_over_on_refused_connections_and_5xx_but_not_on_4xx(
        tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with EmbeddedCoordinator(make_config(tmp_path)) as live:
        client = CoordinatorClient(f"{dead},{live.url}")
        assert client.url == dead
        response = client.get("/api/v1/health", timeout=5)
        assert response.status_code == 200 and client.url == live.url
        assert client.failovers == 1
        # A 4xx is an answer, not a failure: it comes back as it is.
        assert client.post("/api/v1/nodes", json={}, timeout=5).status_code == 422
        assert client.url == live.url and client.failovers == 1
    with pytest.raises(requests.ConnectionError):
        CoordinatorClient([dead]).get("/api/v1/health", timeout=5)


@pytest.mark.parametrize("text", ["", "ftp://c1", "http://c1,", "http://c1,http://c1",
                                  "http://c1:99999", "c1:8080"])
def test_client_refuses_bad_url_lists(text: str) -> None:
    with pytest.raises(ValueError, match="coordinator URL"):
        CoordinatorClient(text)


# -- real training workers reporting to two coordinators -------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_training_workers_fail_over_to_the_other_coordinator(
        postgres_url: str, etcd_server: object, tmp_path: Path) -> None:  # noqa: F811
    """`horderun --coordinator C1,C2`: C1 is SIGKILLed mid-training; the workers go on
    reporting to C2, and the ledger equals what each worker logged it contributed."""
    _fresh_schema(postgres_url)
    job = f"replicated-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "logs"
    out.mkdir()
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(ServerProcess(postgres_url, tmp_path / name, "--rendezvous",
                                     etcd_server.url, "--job", job))  # type: ignore[attr-defined]
    for server in servers:
        server.start()
    first, second = servers
    training = subprocess.Popen(
        [sys.executable, "-m", "elastic.launcher.cli", "-np", "3", "--rendezvous",
         etcd_server.url, "--job", job,  # type: ignore[attr-defined]
         "--coordinator", f"{first.url},{second.url}", "--log-level", "INFO",
         sys.executable, str(CREDIT_WORKER)],
        env=repo_env(OUT=str(out), STEPS="80", STEP_DELAY="0.05"), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while sum(own_samples(out).values()) < 3 * 5 * 20:
            assert time.monotonic() < deadline and training.poll() is None, "no training"
            time.sleep(0.2)
        first.kill()
        _, err = training.communicate(timeout=150)
        assert training.returncode == 0, err
        assert f"workers report credit to {first.url} (then {second.url}" in err
        assert f"coordinator: now using {second.url}" in err
        expected = own_samples(out)
        assert len(expected) == 3 and all(expected.values())
        deadline = time.monotonic() + 20
        while pg_ledger(postgres_url) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pg_ledger(postgres_url) == expected
    finally:
        if training.poll() is None:
            training.kill()
            training.wait(10)
        for server in servers:
            server.stop()


def pg_ledger(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT node_id, SUM(credit) FROM credits GROUP BY node_id")).all()
    finally:
        engine.dispose()
    return {node: int(total) for node, total in rows}


class _OlderCoordinator(http.server.BaseHTTPRequestHandler):
    """Registration as a coordinator from before own tokens answers it: 422 for a body
    with a `token`, 201 with an issued token otherwise."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if "token" in body:
            code, answer = 422, {"error": "unknown field 'token'", "field": "token"}
        else:
            code, answer = 201, {"node_id": body["node_id"], "token": "hrd_issued"}
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass


def test_reporter_registers_with_an_older_coordinator_without_its_own_token() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OlderCoordinator)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    reporter = CreditReporter(f"http://127.0.0.1:{server.server_address[1]}", "n1", JOB)
    try:
        assert reporter._register() is True  # noqa: SLF001 - the registration step alone
        assert reporter._token == "hrd_issued"  # noqa: SLF001
    finally:
        reporter.close(timeout=1)
        server.shutdown()
        server.server_close()
