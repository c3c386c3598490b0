"""Credit minting attacks against a real coordinator (waitress, SQLite file) and a real etcd.

Volunteers can register with the coordinator and post whatever reports they like. Each
test injects one attack from issue 11 over HTTP and checks what a job owner would check:
no credit in the ledger file, the job's generation and round counter untouched, a clear
rejection; and that honest members of a generation the rendezvous published still earn.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from elastic.credit.reporter import CreditReporter
from elastic.credit.reports import report_synchronous
from rendezvous import backend_from_url
from rendezvous.generation import Generation, Member
from rendezvous.keys import JobKeys
from tests.coordinator.helpers import auth, report
from tests.coordinator.serverproc import ServerProcess

pytestmark = [pytest.mark.timeout(120)]


class Cluster:
    """A coordinator process that reads `job` from a real etcd, over a SQLite file."""

    def __init__(self, etcd_url: str, tmp: Path) -> None:
        self.job = f"sec-{uuid.uuid4().hex[:6]}"
        self.db = tmp / "ledger.sqlite"
        self.backend = backend_from_url(etcd_url)
        self.keys = JobKeys("horde", self.job)
        self.server = ServerProcess(f"sqlite:///{self.db}", tmp, "--rendezvous", etcd_url,
                                    "--job", self.job, trust_reported_membership=False)
        self.url = self.server.start()
        self.tokens: dict[str, str] = {}

    def publish(self, generation: int, members: list[str]) -> None:
        """What the training leader writes: a generation of `members`."""
        gen = Generation(id=generation, members=tuple(Member(n, f"h-{n}", "127.0.0.1")
                                                      for n in members),
                         store_host="127.0.0.1", store_port=1, created_at=time.time())
        self.backend.put(self.keys.generation, gen.to_json())

    def register(self, node: str, **body: Any) -> requests.Response:
        response = requests.post(f"{self.url}/api/v1/nodes", json={"node_id": node, **body},
                                 timeout=10)
        if response.status_code == 201:
            self.tokens[node] = response.json()["token"]
        return response

    def post(self, node: str, reports: list[dict[str, Any]]) -> requests.Response:
        return requests.post(f"{self.url}/api/v1/reports", headers=auth(self.tokens[node]),
                             json={"node_id": node, "reports": reports}, timeout=10)

    def credit(self, node: str) -> int:
        return requests.get(f"{self.url}/api/v1/nodes/{node}", timeout=10).json()["credit"]

    def ledger(self) -> dict[str, int]:
        """Credit per node as the ledger file holds it."""
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT node_id, SUM(credit) FROM credits GROUP BY node_id")
            return {node: int(total) for node, total in rows}

    def generations(self) -> dict[int, str]:
        with sqlite3.connect(self.db) as conn:
            return dict(conn.execute("SELECT generation, members FROM generations "
                                     "WHERE job = ?", (self.job,)))

    def job_status(self) -> dict[str, Any]:
        status = requests.get(f"{self.url}/api/v1/status", timeout=10).json()
        return status["job"]

    def close(self) -> None:
        self.server.stop()
        self.backend.close()


@pytest.fixture
def cluster(etcd_server: Any, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(etcd_server.url, tmp_path)
    try:
        yield c
    finally:
        c.close()


def rejected(response: requests.Response, reason: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["credited"] == 0 and body["stored"] == 0, body
    assert [r["reason"] for r in body["results"]] == [reason] * len(body["results"]), body
    return body


def honest_round(cluster: Cluster, generation: int, members: list[str], rnd: int,
                 samples: int) -> None:
    """Every member reports the round, resending (as workers do) while the coordinator
    has not read the generation yet (its rendezvous reads are cached for a moment)."""
    for node in members:
        deadline = time.monotonic() + 10
        while True:
            response = cluster.post(node, [report(rnd, members,
                                                  dict.fromkeys(members, samples),
                                                  generation=generation, job=cluster.job)])
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            if not results[0].get("retry") or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert response.json()["stored"] == 1, response.text


def test_never_admitted_nodes_cannot_credit_a_made_up_generation(cluster: Cluster) -> None:
    for node in ("a", "b", "x", "y"):
        assert cluster.register(node).status_code == 201
    cluster.publish(1, ["a", "b"])
    honest_round(cluster, 1, ["a", "b"], 0, 32)
    # x and y were never admitted; they describe a two-member round of generation 7
    for node in ("x", "y"):
        body = rejected(cluster.post(node, [report(0, ["x", "y"], {"x": 1000, "y": 1000},
                                                   generation=7, job=cluster.job)]),
                        "generation_unknown")
        assert "not known from the rendezvous" in body["results"][0]["message"]
    # ... and of the job's real generation 1
    for node in ("x", "y"):
        rejected(cluster.post(node, [report(1, ["x", "y"], {"x": 1000, "y": 1000},
                                            generation=1, job=cluster.job)]),
                 "membership_mismatch")
    assert cluster.ledger() == {"a": 32, "b": 32}
    assert cluster.credit("x") == 0 and cluster.credit("y") == 0
    assert cluster.generations() == {1: '["a","b"]'}  # no generation created or overwritten
    assert cluster.job_status()["generation"] == 1


def test_out_of_range_numbers_get_422(cluster: Cluster) -> None:
    huge = int("9" * 4000)
    response = cluster.register("h", hardware={"gpu_memory_gb": huge})
    assert response.status_code == 422, response.text
    assert "hardware" in response.json()["error"]["message"]
    assert cluster.register("x").status_code == 201
    for field, value in (("generation", 2**53 - 1), ("round", 2**53 - 1)):
        bad = report(0, ["x"], {"x": 1}, job=cluster.job)
        bad[field] = value
        response = cluster.post("x", [bad])
        assert response.status_code == 422, response.text
        assert field in response.json()["error"]["message"]
    nodes = requests.get(f"{cluster.url}/api/v1/nodes", timeout=10).json()["nodes"]
    assert [n["node_id"] for n in nodes] == ["x"]


def test_claims_beyond_what_a_generation_allows_are_rejected(cluster: Cluster) -> None:
    for node in ("a", "b", "c"):
        cluster.register(node)
    cluster.publish(1, ["a", "b", "c"])
    members = ["a", "b", "c"]
    # colluding members b and c each claim 10^9 samples for the other
    for node in ("b", "c"):
        rejected(cluster.post(node, [report(0, members, {"a": 8, "b": 10**9, "c": 10**9},
                                            job=cluster.job)]), "over_limit")
    # a huge span (the schema allows 10^6; this coordinator's limit is 1024 rounds)
    for node in ("b", "c"):
        rejected(cluster.post(node, [report(1, members, dict.fromkeys(members, 8),
                                            job=cluster.job, span=10**6)]), "over_limit")
    assert cluster.ledger() == {}
    assert cluster.job_status()["rounds"] == 0
    honest_round(cluster, 1, members, 2, 8)
    assert cluster.ledger() == {"a": 8, "b": 8, "c": 8}
    assert cluster.job_status()["rounds"] == 1


def test_colluders_describing_a_generation_first_do_not_block_honest_members(
        cluster: Cluster) -> None:
    for node in ("a", "b", "x", "y"):
        cluster.register(node)
    cluster.publish(1, ["a", "b"])
    # x and y describe generation 2 before the leader has published it
    for node in ("x", "y"):
        body = rejected(cluster.post(node, [report(0, ["x", "y"], {"x": 64, "y": 64},
                                                   generation=2, job=cluster.job)]),
                        "generation_unknown")
        assert body["results"][0]["retry"] is True
    cluster.publish(2, ["a", "b"])
    honest_round(cluster, 2, ["a", "b"], 0, 16)
    assert cluster.ledger() == {"a": 16, "b": 16}
    assert cluster.generations()[2] == '["a","b"]'


def test_worker_resends_a_report_once_its_generation_is_known(cluster: Cluster) -> None:
    cluster.publish(1, ["a", "b"])
    reporters = [CreditReporter(cluster.url, node, cluster.job) for node in ("a", "b")]
    try:
        # both members report generation 2 before the coordinator can read it
        for reporter in reporters:
            reporter.record(report_synchronous(cluster.job, 2, 0, ["a", "b"], [5, 7]))
        deadline = time.monotonic() + 30
        while not all(r._retry for r in reporters):
            assert time.monotonic() < deadline, "the reports were never rejected for a retry"
            time.sleep(0.1)
        assert cluster.ledger() == {}
        cluster.publish(2, ["a", "b"])
        while cluster.ledger() != {"a": 5, "b": 7}:
            assert time.monotonic() < deadline, f"not credited after resends: {cluster.ledger()}"
            time.sleep(0.2)
    finally:
        for reporter in reporters:
            reporter.close(timeout=2)
    assert all(r.given_up == 0 for r in reporters)


def test_a_coordinator_without_rendezvous_credits_nothing_by_default(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'ledger.sqlite'}", tmp_path,
                           trust_reported_membership=False)
    url = server.start()
    try:
        tokens = {}
        for node in ("a", "b"):
            tokens[node] = requests.post(f"{url}/api/v1/nodes", json={"node_id": node},
                                         timeout=10).json()["token"]
        for node in ("a", "b"):
            response = requests.post(
                f"{url}/api/v1/reports", headers=auth(tokens[node]), timeout=10,
                json={"node_id": node, "reports": [report(0, ["a", "b"], {"a": 5, "b": 5})]})
            body = rejected(response, "generation_unknown")
            assert body["results"][0]["retry"] is False  # nothing to wait for: no rendezvous
            assert "configure its rendezvous" in body["results"][0]["message"]
        assert "cannot verify generations" in server.log_path.read_text()
    finally:
        server.stop()
