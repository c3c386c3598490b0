"""The validation layer for values read from etcd (rendezvous/records.py) and its readers.

Unit tests of the parsers, then the readers that use them (control keys, registrations,
the blacklist, the leader's view) on the in-memory backend and on a real etcd.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from elastic.core.stall import Activity
from rendezvous import records
from rendezvous.agent import (
    UNREADABLE_LEADER,
    ControlState,
    NodeAgent,
    blacklist_node,
    parse_control,
    registration,
)
from rendezvous.backend import KeyValue
from rendezvous.generation import BlacklistEntry, Generation, JobStatus, Member, NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.memory import MemoryBackend
from rendezvous.records import InvalidRecordError
from rendezvous.settings import RendezvousSettings

KEYS = JobKeys("horde", "job")
NODE = NodeInfo(node_id="n0", host="h0", addr="10.0.0.1", store_port=29500, lease=7,
                registered_at=1.5, hardware={"gpu": "RTX"})
GEN = Generation(id=3, members=(Member("n0", "h0", "10.0.0.1", 1, 7),
                                Member("n1", "h1", "10.0.0.2", 2, 8)),
                 store_host="10.0.0.1", store_port=29500, reason="r", created_at=2.0)


def with_fields(record: Any, **changes: Any) -> bytes:
    return json.dumps({**json.loads(record.to_json()), **changes}).encode()


def kv(key: str, value: bytes, lease: int = 0, revision: int = 1) -> KeyValue:
    return KeyValue(key, value, revision, revision, lease)


# -- the parsers --------------------------------------------------------------------------


def test_valid_records_round_trip() -> None:
    assert NodeInfo.from_json(NODE.to_json()) == NODE
    assert Generation.from_json(GEN.to_json()) == GEN
    for until in (float("inf"), 12.5):
        entry = BlacklistEntry("n0", "why", until, 3)
        assert BlacklistEntry.from_json(entry.to_json()) == entry
    assert JobStatus.from_json(JobStatus("failed", "m").to_json()) == JobStatus("failed", "m")
    assert records.parse_reset(b'{"generation": 4, "by": "n0"}') == 4
    assert records.parse_ready(b'{"generation": 4, "reset": true}') == (4, True)
    assert records.parse_ready(b'{"generation": 0}') == (0, False)


@pytest.mark.parametrize("value, problem", [
    (b"not json", "Invalid JSON"),
    (b"[1, 2]", "object"),
    (b"", "Invalid JSON"),
    (b"\xff\xfe", "Invalid JSON"),
    (with_fields(NODE, store_port="29500"), "store_port"),
    (with_fields(NODE, store_port=0), "store_port"),
    (with_fields(NODE, store_port=10**30), "store_port"),
    (with_fields(NODE, slots=True), "slots"),
    (with_fields(NODE, slots=0), "slots"),
    (with_fields(NODE, lease=-1), "lease"),
    (with_fields(NODE, node_id="a/b"), "node_id"),
    (with_fields(NODE, node_id=""), "node_id"),
    (with_fields(NODE, addr="not a host:port; rm -rf"), "addr"),
    (with_fields(NODE, host="h" * 300), "host"),
    (with_fields(NODE, hardware={str(i): i for i in range(100)}), "hardware"),
    (with_fields(NODE, registered_at=1e300), "registered_at"),
    (NODE.to_json()[:-1] + b', "registered_at": NaN}', "registered_at"),
    (b'{"node_id": "n"}', "store_port"),
])
def test_bad_registrations_are_refused_with_the_field(value: bytes, problem: str) -> None:
    with pytest.raises(InvalidRecordError, match="node registration") as info:
        records.parse_node_info(value)
    assert problem in str(info.value)


def test_a_huge_value_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidRecordError, match="bytes"):
        records.parse_node_info(b" " * (records.MAX_SMALL_RECORD_BYTES + 1))
    with pytest.raises(InvalidRecordError, match="bytes"):
        records.parse_generation(b" " * (records.MAX_RECORD_BYTES + 1))


@pytest.mark.parametrize("value, problem", [
    (with_fields(GEN, members=[]), "members"),
    (with_fields(GEN, store_port=70000), "store_port"),
    (with_fields(GEN, store_host="http://x/"), "store_host"),
    (with_fields(GEN, id=-1), "id"),
    (with_fields(GEN, id=2**60), "id"),
    (with_fields(GEN, id="3"), "id"),
    (with_fields(GEN, members=[json.loads(json.dumps(GEN.members[0].__dict__))] * 2),
     "listed twice"),
    (with_fields(GEN, members=[{"node_id": "n0"}]), "members"),
    (with_fields(GEN, members="n0,n1"), "members"),
])
def test_bad_generations_are_refused(value: bytes, problem: str) -> None:
    with pytest.raises(InvalidRecordError, match="generation") as info:
        records.parse_generation(value)
    assert problem in str(info.value)


@pytest.mark.parametrize("parse, value", [
    (records.parse_blacklist_entry, b'{"node_id": "n", "reason": "r", "until": "soon"}'),
    (records.parse_blacklist_entry, b'{"node_id": "n", "reason": "r", "until": NaN}'),
    (records.parse_blacklist_entry, b'{"node_id": 7, "reason": "r", "until": 1}'),
    (records.parse_blacklist_entry, b'{"node_id": "n", "reason": "r", "until": 1, "count": 0}'),
    (records.parse_status, b'{"state": "exploded"}'),
    (records.parse_status, b'{"state": "failed", "message": 5}'),
    (records.parse_status, b'"failed"'),
    (records.parse_reset, b'{"generation": "1"}'),
    (records.parse_reset, b'{"generation": 1e400}'),
    (records.parse_reset, b"not json"),
    (records.parse_ready, b"1"),
    (records.parse_ready, b'{"generation": -1}'),
    (records.parse_ready, b'{"generation": 3, "reset": 1}'),
    (records.parse_ready, b'{"reset": true}'),
    (records.parse_job_config, b'{"rendezvous": {"LD_PRELOAD": "x"}, '
                               b'"HORDE_COLLECTIVE_TIMEOUT": "30"}'),
    (records.parse_job_config, b'{"rendezvous": {"HORDE_JOB": "a\\nb"}, '
                               b'"HORDE_COLLECTIVE_TIMEOUT": "30"}'),
    (records.parse_job_config, b'{"rendezvous": {}}'),
])
def test_other_bad_records_are_refused(parse: Any, value: bytes) -> None:
    with pytest.raises(InvalidRecordError):
        parse(value)


def test_text_values() -> None:
    assert records.parse_text(b"n0", "leader key") == "n0"
    for bad in (b"\xff", b"a\nb", b"x" * 2000):
        with pytest.raises(InvalidRecordError, match="leader key"):
            records.parse_text(bad, "leader key")


def test_node_id_of_a_key() -> None:
    assert records.node_id_of("/p/j/leaving/n0", "/p/j/leaving/") == "n0"
    assert records.node_id_of("/p/j/leaving/a/b", "/p/j/leaving/") is None
    assert records.node_id_of("/p/j/leaving/", "/p/j/leaving/") is None


def test_read_record_logs_each_bad_version_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rendezvous.records")
    bad = kv("/horde/job/nodes/once-" + str(time.time()), b"not json", revision=5)
    assert records.read_record(bad, records.parse_node_info) is None
    assert records.read_record(bad, records.parse_node_info) is None
    lines = [r.getMessage() for r in caplog.records if bad.key in r.getMessage()]
    assert len(lines) == 1 and "revision 5" in lines[0] and "Invalid JSON" in lines[0], lines
    again = KeyValue(bad.key, bad.value, 6, 1, 0)
    assert records.read_record(again, records.parse_node_info) is None
    assert len([r for r in caplog.records if bad.key in r.getMessage()]) == 2


def test_activity_records_with_infinite_numbers_are_skipped() -> None:
    assert Activity.from_json(b'{"node_id": "n", "rank": Infinity, "generation": 1, '
                              b'"what": "x", "since": 1}') is None
    assert Activity.from_json(b'{"node_id": "n", "rank": 0, "generation": 1, '
                              b'"what": "x", "since": NaN}') is None


# -- the readers --------------------------------------------------------------------------


def test_parse_control_ignores_bad_values_and_keeps_the_last_generation() -> None:
    previous = ControlState(generation=GEN, leader="n0")
    kvs = [kv(KEYS.generation, b"not json"), kv(KEYS.reset, b"[]"),
           kv(KEYS.status, b'{"state": 1}'), kv(KEYS.leader, b"\xff\x00")]
    control = parse_control(kvs, KEYS, previous)
    assert control == ControlState(GEN, -1, None, UNREADABLE_LEADER, leader_lease=0,
                                   leader_revision=1)
    assert parse_control(kvs, KEYS).generation is None


def test_registration_needs_its_own_key_and_a_lease() -> None:
    key = KEYS.node("n0")
    assert registration(kv(key, NODE.to_json(), lease=7), KEYS) == NODE
    assert registration(kv(key, NODE.to_json(), lease=0), KEYS) is None  # no lease
    assert registration(kv(key, NODE.to_json(), lease=9), KEYS) is None  # another lease
    assert registration(kv(KEYS.node("victim"), NODE.to_json(), lease=7), KEYS) is None
    assert registration(kv(key, b"not json", lease=7), KEYS) is None


def test_blacklisting_over_a_garbage_entry_starts_counting_again() -> None:
    backend = MemoryBackend()
    backend.put(KEYS.blacklisted("n0"), b"not json")
    entry = blacklist_node(backend, KEYS, "n0", "why", (10.0, 10.0))
    assert entry.count == 1
    assert BlacklistEntry.from_json(backend.get(KEYS.blacklisted("n0")).value) == entry


def test_job_cooldown_from_an_unreadable_config_is_none() -> None:
    from elastic.launcher.cli import _job_cooldown

    backend = MemoryBackend()
    for value in (b"not json", b'{"rendezvous": {"HORDE_BLACKLIST_COOLDOWN": "1 x"}, '
                               b'"HORDE_COLLECTIVE_TIMEOUT": "30"}'):
        backend.put(KEYS.config, value)
        assert _job_cooldown(backend, KEYS) is None
    backend.put(KEYS.config, b'{"rendezvous": {"HORDE_BLACKLIST_COOLDOWN": "5 60"}, '
                             b'"HORDE_COLLECTIVE_TIMEOUT": "30"}')
    assert _job_cooldown(backend, KEYS) == (5.0, 60.0)


def _settings(**changes: Any) -> RendezvousSettings:
    base = dict(job="job", min_np=1, max_np=3, target_np=2, lease_ttl=2, settle_window=0.1,
                start_timeout=5, poll_interval=0.05)
    return RendezvousSettings(**{**base, **changes})


def _agent(backend: Any, node_id: str, order: int) -> NodeAgent:
    info = NodeInfo(node_id=node_id, host="127.0.0.1", addr="127.0.0.1",
                    store_port=29500 + order, order=order)
    return NodeAgent(backend, _settings(), info)


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(params=["memory", "etcd"])
def backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        yield MemoryBackend()
        return
    from rendezvous.etcd import EtcdBackend

    server = request.getfixturevalue("etcd_server")
    etcd = EtcdBackend(server.host, server.port)
    yield etcd
    etcd.close()


def _start_agents(backend: Any, job: str, agents: list, count: int = 2) -> None:
    """Start `count` agents n0.. of `job`, appending each to `agents` (the caller stops them)."""
    for i in range(count):
        info = NodeInfo(node_id=f"n{i}", host="127.0.0.1", addr="127.0.0.1",
                        store_port=29500 + i, order=i)
        agent = NodeAgent(backend, _settings(job=job), info)
        agent.start()
        agents.append(agent)


def test_leader_survives_garbage_and_never_admits_a_lease_less_node(
        backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rendezvous.records")
    job = f"job-{time.time_ns()}"
    keys = JobKeys("horde", job)
    agents = []
    try:
        _start_agents(backend, job, agents)
        assert _wait(lambda: all(a.control.generation is not None for a in agents))
        first = agents[0].control.generation
        assert first.node_ids == ["n0", "n1"]
        ghost = NodeInfo(node_id="ghost", host="127.0.0.1", addr="127.0.0.1", store_port=1)
        backend.put(keys.node("ghost"), ghost.to_json())
        backend.put(keys.node("garbage"), b"not json")
        backend.put(keys.blacklisted("n1"), b"not json")
        backend.put(keys.generation, b"{}")
        assert _wait(lambda: any(keys.node("ghost") in r.getMessage() for r in caplog.records))
        time.sleep(1.0)  # a settle window and more: a leader that counted it would admit it
        assert all(a.error is None for a in agents), [a.error for a in agents]
        assert all(a.control.generation == first for a in agents)
        # A real newcomer is still admitted, and the bad generation key is replaced.
        late = NodeAgent(backend, _settings(job=job),
                         NodeInfo(node_id="n2", host="127.0.0.1", addr="127.0.0.1",
                                  store_port=29502, order=2))
        late.start()
        agents.append(late)
        assert _wait(lambda: late.control.generation is not None
                     and late.control.generation.rank_of("n2") is not None)
        gen = late.control.generation
        assert gen.id == first.id + 1 and gen.node_ids == ["n0", "n1", "n2"]
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert keys.node("garbage") in logged and keys.generation in logged
    finally:
        for agent in agents:
            agent.stop()


def test_a_leader_that_never_saw_a_generation_does_not_publish_over_an_unreadable_one(
        caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    backend.put(KEYS.generation, b"not json")
    agents = [_agent(backend, f"n{i}", i) for i in range(2)]
    try:
        for agent in agents:
            agent.start()
        assert _wait(lambda: any(a.is_leader for a in agents))
        time.sleep(0.5)
        assert backend.get(KEYS.generation).value == b"not json"
        assert all(a.error is None for a in agents)
    finally:
        for agent in agents:
            agent.stop()


def test_a_key_that_is_not_utf8_is_skipped_by_a_real_etcd_read(
        etcd_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    import base64

    from rendezvous.etcd import EtcdBackend

    caplog.set_level(logging.WARNING, logger="rendezvous.records")
    keys = JobKeys("horde", f"utf8-{time.time_ns()}")
    backend = EtcdBackend(etcd_server.host, etcd_server.port)
    try:
        backend.put(keys.node("fine"), b"x")
        raw = keys.nodes.encode() + b"bad-\xff"
        backend._post("put", "/kv/put", {"key": base64.b64encode(raw).decode(),
                                         "value": base64.b64encode(b"x").decode()})
        kvs, _ = backend.get_prefix(keys.root)
        assert [kv.key for kv in kvs] == [keys.node("fine")]
        assert any(keys.nodes + "bad-\\xff" in r.getMessage() and "not UTF-8" in r.getMessage()
                   for r in caplog.records), caplog.text
    finally:
        backend.delete_prefix(keys.root)
        backend.close()


@pytest.mark.parametrize("value", [b"ghost", b"\xff\xfe"])
def test_a_leader_key_bound_to_no_lease_is_taken_over(backend: Any, value: bytes) -> None:
    job = f"job-{time.time_ns()}"
    keys = JobKeys("horde", job)
    backend.put(keys.leader, value)  # no lease: it would never expire
    agents = []
    try:
        _start_agents(backend, job, agents)
        assert _wait(lambda: all(a.control.generation is not None for a in agents))
        assert sum(a.is_leader for a in agents) == 1
        leader = backend.get(keys.leader)
        assert leader.value in (b"n0", b"n1") and leader.lease
        # The same when the key is overwritten under a running leader.
        backend.put(keys.leader, value)
        assert _wait(lambda: (lambda kv: kv is not None and kv.lease != 0)(
            backend.get(keys.leader)))
        assert _wait(lambda: sum(a.is_leader for a in agents) == 1)
        assert all(a.error is None for a in agents)
    finally:
        for agent in agents:
            agent.stop()
