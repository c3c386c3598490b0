"""Crash safety: kill -9 the real server (waitress, SQLite) while workers report.

The load generator knows which batches were acknowledged (200) and which were only
sent. After each kill the database must hold every acknowledged report, nothing that
was never sent, and a ledger equal to the credit computed independently from the
reports it holds; after the restart and the retries, the ledger must equal the credit
of every report: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from coordinator.storage import Storage
from coordinator.storage.models import nodes, reports
from tests.coordinator.helpers import JOB, auth, report
from tests.coordinator.serverproc import ServerProcess

MEMBERS = ["w0", "w1", "w2"]
ROUNDS = 900
BATCH = 15
KILL_AFTER = (0.25, 0.6)  # fractions of acknowledged batches at which to kill -9
REQUEST_TIMEOUT = 10.0
DEADLINE = 90.0


def samples_of(node: str, rnd: int) -> int:
    return 1 + (sum(map(ord, node)) * 31 + rnd * 7) % 64


def expected_credit(stored: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Credit from a set of (reporter, round) honest reports: three members, quorum 2."""
    by_round: dict[int, set[str]] = {}
    for reporter, rnd in stored:
        by_round.setdefault(rnd, set()).add(reporter)
    credit = dict.fromkeys(MEMBERS, 0)
    for rnd, reporters in by_round.items():
        for node in MEMBERS:
            if set(MEMBERS) - {node} <= reporters:
                credit[node] += samples_of(node, rnd)
    return credit


class Worker(threading.Thread):
    """One node posting its reports in batches, retrying until each is acknowledged."""

    def __init__(self, node: str, token: str, server: ServerProcess, log: dict) -> None:
        super().__init__(daemon=True, name=f"worker-{node}")
        self.node, self.token, self.server, self.log = node, token, server, log
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test
            self.error = exc

    def _run(self) -> None:
        session = requests.Session()
        rounds = list(range(ROUNDS))
        random.Random(self.node).shuffle(rounds)  # nodes report rounds in different orders
        for start in range(0, ROUNDS, BATCH):
            chunk = rounds[start:start + BATCH]
            body = {"node_id": self.node, "reports": [
                report(r, MEMBERS, {m: samples_of(m, r) for m in MEMBERS}) for r in chunk]}
            keys = {(self.node, r) for r in chunk}
            while True:
                if time.monotonic() > self.log["deadline"]:
                    raise TimeoutError(f"{self.node}: batch at {start} never acknowledged")
                with self.log["lock"]:
                    self.log["sent"] |= keys
                try:
                    response = session.post(self.server.url + "/api/v1/reports", json=body,
                                            headers=auth(self.token), timeout=REQUEST_TIMEOUT)
                except requests.RequestException:
                    time.sleep(0.05)  # the server is down: back off and resend
                    session = requests.Session()
                    continue
                assert response.status_code == 200, response.text
                assert response.json()["rejected"] == 0
                with self.log["lock"]:
                    self.log["acked"] |= keys
                    self.log["batches"] += 1
                break


def db_state(db_url: str) -> tuple[set[tuple[str, int]], dict[str, int]]:
    storage = Storage(db_url)
    try:
        with storage.read() as conn:
            stored = {(r.reporter, int(r.round)) for r in conn.execute(
                select(reports.c.reporter, reports.c.round).where(reports.c.job == JOB))}
            ledger = {r.node_id: int(r.credit_total) for r in conn.execute(select(nodes))}
    finally:
        storage.dispose()
    return stored, ledger


@pytest.mark.timeout(150)
def test_kill_9_loses_nothing_acknowledged_and_counts_nothing_twice(tmp_path: Path):
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    server = ServerProcess(db_url, tmp_path)
    log = {"lock": threading.Lock(), "sent": set(), "acked": set(), "batches": 0,
           "deadline": time.monotonic() + DEADLINE}
    try:
        server.start()
        tokens = {}
        for node in MEMBERS:
            response = requests.post(server.url + "/api/v1/nodes", json={"node_id": node},
                                     timeout=REQUEST_TIMEOUT)
            assert response.status_code == 201
            tokens[node] = response.json()["token"]
        workers = [Worker(n, tokens[n], server, log) for n in MEMBERS]
        for w in workers:
            w.start()
        total_batches = len(MEMBERS) * -(-ROUNDS // BATCH)
        in_flight: list[int] = []
        for fraction in KILL_AFTER:
            while log["batches"] < fraction * total_batches:
                assert time.monotonic() < log["deadline"], "load generator stalled"
                time.sleep(0.002)
            server.kill()
            with log["lock"]:
                acked, sent = set(log["acked"]), set(log["sent"])
            stored, ledger = db_state(db_url)
            assert acked <= stored, f"lost {len(acked - stored)} acknowledged reports"
            assert stored <= sent, "stored reports that were never sent"
            assert ledger == expected_credit(stored)
            in_flight.append(len(sent - acked))
            server.start()
        for w in workers:
            w.join(DEADLINE)
            assert not w.is_alive(), f"{w.name} did not finish"
            assert w.error is None, w.error
        # Replays of acknowledged batches are harmless.
        for node in MEMBERS:
            body = {"node_id": node, "reports": [
                report(r, MEMBERS, {m: samples_of(m, r) for m in MEMBERS}) for r in range(20)]}
            response = requests.post(server.url + "/api/v1/reports", json=body,
                                     headers=auth(tokens[node]), timeout=REQUEST_TIMEOUT)
            assert response.json()["duplicate"] == 20
        every = {(n, r) for n in MEMBERS for r in range(ROUNDS)}
        truth = expected_credit(every)
        for node in MEMBERS:
            response = requests.get(f"{server.url}/api/v1/nodes/{node}", timeout=10)
            assert response.json()["credit"] == truth[node]
        assert server.stop() == 0, server.log_path.read_text()[-2000:]
        stored, ledger = db_state(db_url)
        assert stored == every and ledger == truth
        assert server.starts == 1 + len(KILL_AFTER)
        assert any(in_flight), "no request was in flight at any kill"
        assert "Traceback" not in server.log_path.read_text()
    finally:
        server.stop()
