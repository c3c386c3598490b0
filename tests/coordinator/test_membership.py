"""The coordinator and the rendezvous: node states, the timeline, operator evictions."""

from __future__ import annotations

import math
import time
import uuid

import pytest

from coordinator.state import EXTENSION
from rendezvous.agent import NodeAgent, read_control
from rendezvous.generation import BlacklistEntry, Generation, Member, NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.settings import RendezvousSettings
from tests.coordinator.helpers import ADMIN_TOKEN, auth, post_reports, register, report

PREFIX = "horde"
JOB = "job1"
EVENT_TIMEOUT = 20.0


def publish(backend, members: list[str], generation: int) -> None:
    keys = JobKeys(PREFIX, JOB)
    gen = Generation(id=generation, members=tuple(Member(n, f"h-{n}", "127.0.0.1")
                                                  for n in members),
                     store_host="127.0.0.1", store_port=1)
    backend.put(keys.generation, gen.to_json())


def register_in_rendezvous(backend, node_id: str, **hardware) -> None:
    keys = JobKeys(PREFIX, JOB)
    info = NodeInfo(node_id=node_id, host=f"h-{node_id}", addr="127.0.0.1", store_port=1,
                    hardware=hardware)
    backend.put(keys.node(node_id), info.to_json())


@pytest.fixture
def rdzv(make_app, backend):
    app = make_app(backend=backend, job=JOB)
    return app, app.test_client(), backend


def test_node_states_follow_the_rendezvous(rdzv):
    app, client, backend = rdzv
    for node in ("a", "b", "w"):
        register(client, node)
        register_in_rendezvous(backend, node, gpu="RTX 3060")
    publish(backend, ["a", "b"], 1)
    states = {n["node_id"]: n["state"] for n in client.get("/api/v1/status").get_json()["nodes"]}
    assert states == {"a": "alive", "b": "alive", "w": "waiting"}
    assert client.get("/api/v1/nodes/w").get_json()["state"] == "waiting"
    status = client.get("/api/v1/status").get_json()
    assert status["job"]["generation"] == 1 and status["job"]["world_size"] == 2
    assert status["rendezvous"] == {"configured": True, "reachable": True, "error": None}
    # A node only the rendezvous knows still shows up, with its hardware.
    register_in_rendezvous(backend, "ghost", gpu="A100")
    app.extensions[EXTENSION].view.invalidate()
    nodes = {n["node_id"]: n for n in client.get("/api/v1/status").get_json()["nodes"]}
    assert nodes["ghost"]["registered"] is False and nodes["ghost"]["hardware"] == {"gpu": "A100"}


def test_operator_eviction_writes_a_blacklist_entry(rdzv):
    app, client, backend = rdzv
    register(client, "a")
    register_in_rendezvous(backend, "a")
    publish(backend, ["a"], 1)
    response = client.post("/api/v1/evictions", headers=auth(ADMIN_TOKEN),
                           json={"node_id": "a", "reason": "cheating", "cooldown_seconds": 600})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["node_id"] == "a" and body["reason"] == "cheating" and body["active"]
    assert body["until"] == pytest.approx(time.time() + 600, abs=30)
    entry = BlacklistEntry.from_json(backend.get(JobKeys(PREFIX, JOB).blacklisted("a")).value)
    assert entry.reason == "cheating" and entry.count == 1
    assert client.get("/api/v1/nodes/a").get_json()["state"] == "evicted"
    listed = client.get("/api/v1/evictions").get_json()
    assert listed["configured"] and [e["node_id"] for e in listed["evictions"]] == ["a"]
    kinds = [e["kind"] for e in client.get("/api/v1/status").get_json()["timeline"]]
    assert "evicted" in kinds
    # Permanent when no cooldown is given; a second eviction counts up.
    response = client.post("/api/v1/evictions", headers=auth(ADMIN_TOKEN),
                           json={"node_id": "a"})
    assert response.get_json()["until"] is None and response.get_json()["count"] == 2
    # Pardon removes it; a second pardon finds nothing.
    assert client.delete("/api/v1/evictions/a", headers=auth(ADMIN_TOKEN)).status_code == 204
    assert client.delete("/api/v1/evictions/a", headers=auth(ADMIN_TOKEN)).status_code == 404
    assert client.delete("/api/v1/evictions/a").status_code == 401


def test_watcher_records_generations_joins_and_departures(rdzv):
    app, client, backend = rdzv
    st = app.extensions[EXTENSION]
    publish(backend, ["a", "b"], 1)
    st.watcher.poll_once()
    publish(backend, ["a", "c"], 2)
    st.watcher.poll_once()
    st.watcher.poll_once()  # nothing new: nothing recorded twice
    events = client.get("/api/v1/jobs/job1/timeline").get_json()["events"]
    seen = [(e["kind"], e["node_id"], e["generation"]) for e in reversed(events)]
    assert seen == [("generation", None, 1), ("joined", "a", 1), ("joined", "b", 1),
                    ("generation", None, 2), ("joined", "c", 2), ("left", "b", 2)]


def test_rendezvous_members_are_authoritative_for_reports(rdzv):
    app, client, backend = rdzv
    tokens = {n: register(client, n) for n in ("a", "b", "c", "x")}
    publish(backend, ["a", "b", "c"], 1)
    app.extensions[EXTENSION].watcher.poll_once()
    # x was never a member of generation 1: its report is rejected before any quorum.
    response = post_reports(client, "x", tokens["x"], [
        report(0, ["a", "b", "c", "x"], {"a": 1, "b": 1, "c": 1, "x": 50})])
    assert response.get_json()["results"][0]["reason"] == "membership_mismatch"


def test_unreachable_rendezvous_degrades_the_page_not_the_api(make_app):
    from rendezvous.embedded import free_port
    from rendezvous.etcd import EtcdBackend

    dead = EtcdBackend("127.0.0.1", free_port(), timeout=0.5)
    client = make_app(backend=dead, job=JOB).test_client()
    token = register(client, "a")
    status = client.get("/api/v1/status").get_json()
    assert status["rendezvous"]["reachable"] is False and status["rendezvous"]["error"]
    assert client.get("/api/v1/health").get_json()["rendezvous"] == "unreachable"
    assert client.get("/").status_code == 200
    response = client.post("/api/v1/evictions", headers=auth(ADMIN_TOKEN),
                           json={"node_id": "a"})
    assert response.status_code == 503
    assert post_reports(client, "a", token, [report(0, ["a"], {"a": 1})]).status_code == 200


def _wait(predicate, what: str, timeout: float = EVENT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(60)
def test_eviction_through_the_api_removes_the_node_from_a_real_job(etcd_server, make_app):
    """Real etcd, real agents: the leader drops the evicted node at the next generation."""
    from rendezvous.etcd import EtcdBackend

    job = f"coord-{uuid.uuid4().hex[:8]}"
    prefix = "test-coordinator"
    settings = RendezvousSettings(job=job, prefix=prefix, lease_ttl=2, settle_window=0.1,
                                  poll_interval=0.1, min_np=1, target_np=3, max_np=3,
                                  start_timeout=30, elastic_timeout=30)
    backends = [EtcdBackend(etcd_server.host, etcd_server.port) for _ in range(4)]
    agents = [NodeAgent(backends[i], settings,
                        NodeInfo(node_id=f"n{i}", host=f"h{i}", addr="127.0.0.1",
                                 store_port=29600 + i, order=i)) for i in range(3)]
    app = make_app(rendezvous_url=etcd_server.url, job=job, rendezvous_prefix=prefix)
    client = app.test_client()
    keys = JobKeys(prefix, job)
    try:
        for agent in agents:
            agent.start()
        first = _wait(lambda: (lambda g: g if g and g.size == 3 else None)(
            read_control(backends[3], keys)[0].generation), "a generation of 3")
        response = client.post("/api/v1/evictions", headers=auth(ADMIN_TOKEN),
                               json={"node_id": "n2", "reason": "operator test",
                                     "cooldown_seconds": 300})
        assert response.status_code == 201, response.get_json()
        second = _wait(lambda: (lambda g: g if g and g.id > first.id else None)(
            read_control(backends[3], keys)[0].generation), "a generation without n2")
        assert second.node_ids == ["n0", "n1"]
        app.extensions[EXTENSION].view.invalidate()
        nodes = {n["node_id"]: n["state"]
                 for n in client.get("/api/v1/status").get_json()["nodes"]}
        assert nodes["n2"] == "evicted" and nodes["n0"] == "alive"
        entry = BlacklistEntry.from_json(backends[3].get(keys.blacklisted("n2")).value)
        assert not math.isinf(entry.until) and entry.reason == "operator test"
    finally:
        for agent in agents:
            agent.stop()
        for b in backends:
            b.close()
