"""`NodeAgent`s in one process (one thread each), on `MemoryBackend` and on a real etcd.

Each test builds a small job, drives it through one membership event (failover,
reset, leave, eviction, joins, starvation) and checks the generations the leader
publishes. A node "dies" by having its agent thread stopped without deregistering:
its lease then runs out (or is revoked, to skip the wait).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rendezvous import (
    BlacklistedError,
    EtcdBackend,
    MemoryBackend,
    RendezvousBackend,
    RendezvousClosedError,
    RendezvousTimeoutError,
    records,
)
from rendezvous.agent import ControlState, NodeAgent, blacklist_node, read_control
from rendezvous.errors import RendezvousTLSError
from rendezvous.generation import BlacklistEntry, Generation, JobStatus, NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.settings import RendezvousSettings

# How long a test waits for something the agents should do in well under a second.
# Dominated by lease expiry (2 s on etcd, checked every 500 ms) on a busy machine.
EVENT_TIMEOUT = 15.0


class Job:
    """A job of in-process agents on one backend kind; `close()` stops and revokes all."""

    def __init__(self, kind: str, etcd: Any, **overrides: Any) -> None:
        self.kind = kind
        self._etcd = etcd
        params: dict[str, Any] = dict(
            job=f"agent-{uuid.uuid4().hex[:10]}", prefix="test-agent", lease_ttl=2,
            settle_window=0.2, poll_interval=0.1, start_timeout=30.0, elastic_timeout=30.0,
            reset_timeout=5.0, min_np=1, target_np=3, max_np=8,
        )
        params.update(overrides)
        self.settings = RendezvousSettings(**params)
        self.keys = JobKeys(self.settings.prefix, self.settings.job)
        self._memory = MemoryBackend() if kind == "memory" else None
        self._backends: list[RendezvousBackend] = []
        self.agents: list[NodeAgent] = []
        self.observer = self.backend()

    def backend(self) -> RendezvousBackend:
        """The memory store shared by all, or a fresh etcd client (one per node)."""
        if self._memory is not None:
            return self._memory
        backend = EtcdBackend(self._etcd.host, self._etcd.port)
        self._backends.append(backend)
        return backend

    def agent(self, node_id: str, order: int = 0, host: str | None = None,
              candidate: bool = True, start: bool = True,
              settings: RendezvousSettings | None = None) -> NodeAgent:
        info = NodeInfo(node_id=node_id, host=host or f"host-{node_id}",
                        addr="127.0.0.1", store_port=29500 + len(self.agents), order=order)
        agent = NodeAgent(self.backend(), settings or self.settings, info, candidate=candidate)
        self.agents.append(agent)
        if start:
            agent.start()
        return agent

    def agents_for(self, count: int, **kwargs: Any) -> list[NodeAgent]:
        return [self.agent(f"n{i}", order=i, **kwargs) for i in range(count)]

    # -- observing --------------------------------------------------------------------

    def control(self) -> ControlState:
        return read_control(self.observer, self.keys)[0]

    def generation(self) -> Generation | None:
        return self.control().generation

    def wait_for(self, what: str, predicate: Callable[[ControlState], bool],
                 timeout: float = EVENT_TIMEOUT) -> ControlState:
        """Poll the control keys until `predicate` holds; fail with the last state seen."""
        deadline = time.monotonic() + timeout
        while True:
            control = self.control()
            if predicate(control):
                return control
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                     f"last control state: {control}")
            time.sleep(0.02)

    def wait_generation(self, gen_id: int, timeout: float = EVENT_TIMEOUT) -> Generation:
        control = self.wait_for(f"generation {gen_id}",
                                lambda c: c.generation is not None and c.generation.id >= gen_id,
                                timeout)
        assert control.generation is not None
        return control.generation

    def leader(self, timeout: float = EVENT_TIMEOUT) -> NodeAgent:
        """The one live agent that leads, once the leader key names it."""
        live = [a for a in self.agents if self.alive(a)]
        control = self.wait_for("a leader among the live agents",
                                lambda c: c.leader in {a.node_id for a in live}, timeout)
        leaders = [a for a in live if a.node_id == control.leader]
        assert len(leaders) == 1
        return leaders[0]

    @staticmethod
    def alive(agent: NodeAgent) -> bool:
        return agent._thread is not None and agent._thread.is_alive()

    # -- faults -----------------------------------------------------------------------

    @staticmethod
    def freeze(agent: NodeAgent) -> None:
        """Stop the agent's thread without deregistering: its lease is no longer renewed."""
        agent._stop.set()
        if agent._thread is not None:
            agent._thread.join(timeout=5)
            assert not agent._thread.is_alive(), "agent thread did not stop"

    def kill(self, agent: NodeAgent, how: str) -> None:
        """A node dies: its lease runs out on its own (`expire`) or at once (`revoke`)."""
        self.freeze(agent)
        if how == "revoke":
            self.observer.revoke_lease(agent._lease)

    def close(self) -> None:
        for agent in self.agents:  # all at once: no leader reacts to the others leaving
            agent._stop.set()
        for agent in self.agents:
            try:
                if self.alive(agent):
                    agent.stop()
                elif agent._lease:
                    agent.backend.revoke_lease(agent._lease)
            except Exception:  # noqa: BLE001 - clean up the rest regardless
                pass
        if self._memory is None:
            try:
                self.observer.delete_prefix(self.keys.root)
            except Exception:  # noqa: BLE001
                pass
        for backend in self._backends:
            backend.close()
        leftover = [a.node_id for a in self.agents if self.alive(a)]
        assert not leftover, f"agent threads still running: {leftover}"


@pytest.fixture(params=["memory", "etcd"])
def make_job(request: pytest.FixtureRequest) -> Iterator[Callable[..., Job]]:
    """`make_job(**settings)` on the parametrized backend; every job is closed afterwards."""
    etcd = request.getfixturevalue("etcd_server") if request.param == "etcd" else None
    jobs: list[Job] = []

    def make(**overrides: Any) -> Job:
        job = Job(request.param, etcd, **overrides)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `fn` on a daemon thread; its result or exception lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- forming the job -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_agents_elect_one_leader_and_publish_generation_zero_in_order(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=4, max_np=6)
    for i in (3, 1, 0, 2):  # start order differs from launch order
        job.agent(f"n{i}", order=i)
    gens = [a.wait_for_generation(-1, EVENT_TIMEOUT) for a in job.agents]
    assert {g.id for g in gens} == {0}
    gen = gens[0]
    assert all(g == gen for g in gens)
    assert gen.node_ids == ["n0", "n1", "n2", "n3"]
    assert [gen.rank_of(f"n{i}") for i in range(4)] == [0, 1, 2, 3]
    assert gen.reason == "job started"

    leader = job.leader()
    assert [a.node_id for a in job.agents if a.is_leader] == [leader.node_id]
    assert all(a.control.leader == leader.node_id for a in job.agents)
    assert job.control().status == JobStatus("running")

    time.sleep(1.0)  # a stable job publishes nothing more
    assert job.generation() == gen
    assert [a.node_id for a in job.agents if a.is_leader] == [leader.node_id]
    assert all(a.error is None for a in job.agents)


@pytest.mark.timeout(60)
def test_non_candidates_follow_but_never_lead(make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3)
    job.agent("n0", order=0)
    job.agent("n1", order=1, candidate=False)
    job.agent("n2", order=2, candidate=False)
    gen = job.agents[2].wait_for_generation(-1, EVENT_TIMEOUT)
    assert gen.node_ids == ["n0", "n1", "n2"]
    assert job.leader().node_id == "n0"
    assert not job.agents[1].is_leader and not job.agents[2].is_leader


# -- failover ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["revoke", pytest.param("expire", marks=pytest.mark.lease_wait)])
def test_leader_failover_publishes_without_the_dead_leader(
        make_job: Callable[..., Job], how: str) -> None:
    job = make_job(target_np=4)
    job.agents_for(4)
    first = job.wait_generation(0)
    old = job.leader()
    survivors = [n for n in first.node_ids if n != old.node_id]

    job.kill(old, how)
    gen = next(a for a in job.agents if a is not old).wait_for_generation(0, EVENT_TIMEOUT)
    assert gen.id == 1
    assert gen.node_ids == survivors  # relative order kept
    assert f"lost {old.node_id}" in gen.reason
    new = job.leader()
    assert new is not old and new.node_id in survivors
    assert [a.node_id for a in job.agents if job.alive(a) and a.is_leader] == [new.node_id]
    for agent in job.agents:
        if agent is not old:
            assert agent.wait_for_generation(0, EVENT_TIMEOUT) == gen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("who", ["member", "leader"])
def test_live_node_whose_lease_was_revoked_registers_again(
        make_job: Callable[..., Job], who: str) -> None:
    job = make_job(target_np=3)
    job.agents_for(3)
    job.wait_generation(0)
    leader = job.leader()
    victim = leader if who == "leader" else next(a for a in job.agents if a is not leader)
    others = [a.node_id for a in job.agents if a is not victim]

    job.observer.revoke_lease(victim._lease)  # an operator kicks it, or etcd lost it
    gen = victim.wait_for_generation(0, EVENT_TIMEOUT)
    assert gen.node_ids[-1] == victim.node_id  # back in, as a newcomer
    assert [n for n in gen.node_ids if n != victim.node_id] == others
    assert victim.error is None
    assert all(job.alive(a) and a.error is None for a in job.agents)
    job.leader()


class RecordingBackend:
    """Delegates to a backend and records every compare-and-swap and its outcome."""

    def __init__(self, inner: RendezvousBackend) -> None:
        self._inner = inner
        self.cas: list[tuple[str, int, bool]] = []

    def compare_and_swap(self, key: str, expected: int, value: bytes, lease: int = 0) -> bool:
        ok = self._inner.compare_and_swap(key, expected, value, lease)
        self.cas.append((key, expected, ok))
        return ok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.timeout(60)
def test_stale_leader_cannot_overwrite_a_newer_generation(make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3)
    job.agents_for(3)
    job.wait_generation(0)
    old = job.leader()
    # What the old leader saw, with one (other) node's registration missing: acting on
    # it, a leader would publish generation 1 without that node.
    victim = next(a.node_id for a in job.agents if a is not old)
    kvs, _ = job.observer.get_prefix(job.keys.root)
    stale_kvs = [kv for kv in kvs if kv.key != job.keys.node(victim)]
    stale_control = job.control()

    job.kill(old, "revoke")  # it "pauses"; the others elect a new leader and move on
    newer = job.wait_generation(1)
    assert old.node_id not in newer.node_ids and victim in newer.node_ids

    # The old leader wakes up, still believing it leads, and acts on its stale view.
    assert old.is_leader
    spy = RecordingBackend(old.backend)
    old.backend = spy  # type: ignore[assignment]
    old._lead(stale_kvs, stale_control)
    attempts = [c for c in spy.cas if c[0] == job.keys.generation]
    assert attempts and not any(ok for _, _, ok in attempts), spy.cas
    assert job.generation() == newer  # no lost update


class TLSFailingBackend(RecordingBackend):
    """A backend whose leader-key writes fail TLS verification (a changed etcd CA)."""

    def compare_and_swap(self, key: str, expected: int, value: bytes, lease: int = 0) -> bool:
        raise RendezvousTLSError("TLS to etcd failed: certificate verify failed")


def test_a_tls_failure_while_taking_the_lead_is_the_agents_error_not_a_lost_lease(
        caplog: pytest.LogCaptureFixture) -> None:
    """The agent stops with the TLS error (which names what to fix), instead of taking
    it for an expired lease and registering again."""
    job = Job("memory", None, target_np=1)
    try:
        agent = job.agent("n0", start=False)
        agent.backend = TLSFailingBackend(agent.backend)  # type: ignore[assignment]
        agent.start()
        deadline = time.monotonic() + EVENT_TIMEOUT
        while agent.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert isinstance(agent.error, RendezvousTLSError), agent.error
        assert "registering again" not in caplog.text
    finally:
        job.close()


def test_the_leader_ranks_nodes_marked_trusted_first_and_ignores_a_bad_mark() -> None:
    job = Job("memory", None, target_np=2, max_np=2)
    try:
        job.observer.put(job.keys.trusted_node("n1"), b"1")
        job.observer.put(job.keys.trusted_node("n0"), b"yes")  # not a mark: ignored
        job.agents_for(2)
        assert list(job.wait_generation(0).node_ids) == ["n1", "n0"]
    finally:
        job.close()


# -- resets, leaving, finishing ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_reset_asked_by_a_non_member_or_for_an_old_generation_is_not_announced(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=2)
    job.agents_for(2)
    first = job.wait_generation(0)
    lease = job.observer.grant_lease(30)
    marker = b'{"generation": 0, "reset": true}'
    job.observer.put(job.keys.ready_node("stranger"), marker, lease=lease)
    job.observer.put(job.keys.ready_node(first.node_ids[0]), b'{"generation": 7, '
                     b'"reset": true}', lease=lease)
    time.sleep(1.0)
    assert job.control().reset_of == -1
    assert job.generation() == first
    # the same marker from a member is announced
    job.observer.put(job.keys.ready_node(first.node_ids[1]), marker, lease=lease)
    job.wait_for("the reset announced", lambda c: c.reset_of == 0)


@pytest.mark.timeout(60)
def test_request_reset_by_every_member_republishes_the_same_members(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3)
    job.agents_for(3)
    first = job.wait_generation(0)
    for agent in reversed(job.agents):
        agent.request_reset(first.id)
    gen = job.agents[0].wait_for_generation(first.id, EVENT_TIMEOUT)
    assert gen.id == 1
    assert gen.node_ids == first.node_ids
    assert gen.reason == "collective failure reported"
    assert job.control().reset_of == 0
    # The reset was asked for in each node's own marker; the leader announced it.
    for agent in job.agents:
        marker = job.observer.get(job.keys.ready_node(agent.node_id))
        assert marker is not None
        assert records.parse_ready(marker.value) == (0, True)
    time.sleep(0.5)
    assert job.generation() == gen


@pytest.mark.timeout(60)
def test_reset_timeout_drops_and_blacklists_members_that_never_reported(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3, reset_timeout=0.6, blacklist_cooldown=(30.0, 60.0))
    job.agents_for(3)
    first = job.wait_generation(0)
    started = time.monotonic()
    job.agents[0].request_reset(first.id)
    job.agents[2].request_reset(first.id)
    gen = job.agents[0].wait_for_generation(first.id, EVENT_TIMEOUT)
    assert time.monotonic() - started >= 0.6
    assert gen.node_ids == ["n0", "n2"]
    assert "unresponsive n1" in gen.reason
    kv = job.observer.get(job.keys.blacklisted("n1"))
    assert kv is not None
    record = BlacklistEntry.from_json(kv.value)
    assert record.count == 1 and "reset timeout" in record.reason
    assert record.until >= time.time() + 25


@pytest.mark.timeout(60)
def test_repeat_offender_is_blacklisted_again_with_a_longer_cooldown(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3, reset_timeout=0.5, blacklist_cooldown=(30.0, 600.0))
    # n1 was evicted once before; that entry has expired, so it is back in the job.
    old_entry = BlacklistEntry("n1", "earlier eviction", until=time.time() - 1, count=1)
    job.observer.put(job.keys.blacklisted("n1"), old_entry.to_json())
    job.agents_for(3)
    first = job.wait_generation(0)
    assert first.node_ids == ["n0", "n1", "n2"]
    job.agents[0].request_reset(first.id)
    job.agents[2].request_reset(first.id)
    gen = job.wait_generation(1)
    assert gen.node_ids == ["n0", "n2"]
    kv = job.observer.get(job.keys.blacklisted("n1"))
    assert kv is not None
    record = BlacklistEntry.from_json(kv.value)
    assert record.count == 2, record
    assert record.until >= time.time() + 55  # doubled: 60 s (+ jitter)
    time.sleep(1.0)  # and it is not re-admitted while the new entry is active
    assert job.generation() == gen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("who", ["member", "leader"])
def test_graceful_leave_publishes_without_the_node(make_job: Callable[..., Job],
                                                   who: str) -> None:
    job = make_job(target_np=3)
    job.agents_for(3)
    job.wait_generation(0)
    leader = job.leader()
    leaving = leader if who == "leader" else next(a for a in job.agents if a is not leader)
    stayers = [a for a in job.agents if a is not leaving]

    leaving.stop(reason="left")
    gen = stayers[0].wait_for_generation(0, EVENT_TIMEOUT)
    assert gen.id == 1
    assert gen.node_ids == [a.node_id for a in stayers]
    assert job.observer.get(job.keys.node(leaving.node_id)) is None
    assert job.control().status == JobStatus("running")


@pytest.mark.timeout(60)
def test_node_that_left_can_join_again_under_the_same_id(make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3)
    job.agents_for(3)
    job.wait_generation(0)
    job.agents[0].stop(reason="left")
    assert job.wait_generation(1).node_ids == ["n1", "n2"]

    again = job.agent("n0", order=0)
    gen = again.wait_for_generation(1, EVENT_TIMEOUT)
    assert gen.id == 2
    assert gen.node_ids == ["n1", "n2", "n0"]  # newcomers go last


@pytest.mark.timeout(60)
def test_member_that_finished_finishes_the_job(make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3)
    job.agents_for(3)
    job.wait_generation(0)
    job.agents[1].stop(reason="finished")
    control = job.wait_for("status finished",
                           lambda c: c.status is not None and c.status.state == "finished")
    assert control.generation is not None and control.generation.id == 0
    with pytest.raises(RendezvousClosedError, match="finished"):
        job.agents[0].wait_for_generation(0, EVENT_TIMEOUT)


# -- the blacklist ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_blacklisted_member_is_removed_and_kept_out_until_its_cooldown_ends(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3)
    job.agents_for(3)
    job.wait_generation(0)
    before = time.time()
    entry = blacklist_node(job.observer, job.keys, "n1", "sent NaN gradients", (1.5, 1.5))
    assert entry.count == 1
    assert 1.5 <= entry.until - before <= 1.5 + (time.time() - before)
    # A restarted n1 is refused at once (the check comes before it touches anything).
    fresh = job.agent("n1", order=1, start=False)
    with pytest.raises(BlacklistedError, match="n1 is blacklisted.*sent NaN gradients"):
        fresh.start()
    assert fresh._lease == 0

    gen = job.agents[0].wait_for_generation(0, EVENT_TIMEOUT)
    assert gen.id == 1 and gen.node_ids == ["n0", "n2"]
    job.agents[1].stop()  # the evicted process exits

    time.sleep(max(0.0, entry.until - time.time()) + 0.05)
    fresh.start()  # the cooldown is over
    gen = fresh.wait_for_generation(1, EVENT_TIMEOUT)
    assert gen.id == 2
    assert gen.node_ids == ["n0", "n2", "n1"]


@pytest.mark.timeout(60)
def test_blacklisted_host_keeps_its_nodes_out(make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=2)
    blacklist_node(job.observer, job.keys, "bad-host", "flaky", None)
    job.agent("a", order=0, host="good-host")
    job.agent("b", order=1, host="bad-host")
    job.agent("c", order=2, host="other-host")
    gen = job.wait_generation(0)
    assert gen.node_ids == ["a", "c"]
    with pytest.raises(RendezvousTimeoutError):
        job.agents[1].wait_for_generation(-1, 0.5)


# -- joins ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_joiners_within_the_settle_window_cost_one_generation(
        make_job: Callable[..., Job]) -> None:
    # A wider window than elsewhere: the three starts must land inside it on a busy CI box.
    job = make_job(target_np=2, settle_window=0.5)
    job.agents_for(2)
    first = job.wait_generation(0)
    seen: list[int] = []
    job.agents[0].add_listener(
        lambda c: seen.append(c.generation.id) if c.generation is not None else None)

    for i in (2, 3, 4):
        job.agent(f"n{i}", order=i)
    gen = job.agents[-1].wait_for_generation(first.id, EVENT_TIMEOUT)
    assert gen.id == 1, f"joins were not batched: {gen}"
    assert gen.node_ids == ["n0", "n1", "n2", "n3", "n4"]
    time.sleep(1.0)
    assert job.generation() == gen
    assert set(seen) <= {0, 1}


@pytest.mark.timeout(90)
def test_a_steady_stream_of_joins_is_admitted_while_it_lasts(
        make_job: Callable[..., Job]) -> None:
    # Joins every 0.25 s never leave the settle window (1 s) quiet: the admission window
    # (1.5 s) must admit the first joiners while the others still arrive, once each.
    job = make_job(target_np=2, settle_window=1.0, admission_window=1.5, max_np=20)
    job.agents_for(2)
    first = job.wait_generation(0)
    generations: list[Generation] = []
    job.agents[0].add_listener(
        lambda c: generations.append(c.generation) if c.generation is not None else None)
    joiners = [f"n{i}" for i in range(2, 16)]
    admitted_while_joining: Generation | None = None
    for i, node_id in enumerate(joiners):
        job.agent(node_id, order=i + 2)
        gen = job.generation()
        if admitted_while_joining is None and gen is not None and "n2" in gen.node_ids:
            admitted_while_joining = gen
        time.sleep(0.25)
    assert admitted_while_joining is not None, (
        "no generation admitted the first joiner while joins kept arriving")
    assert joiners[-1] not in admitted_while_joining.node_ids
    last = job.agents[-1].wait_for_generation(first.id, EVENT_TIMEOUT)
    assert last.node_ids == ["n0", "n1"] + joiners
    deadline = time.monotonic() + EVENT_TIMEOUT  # n0's listener sees it too
    while not (generations and generations[-1].id >= last.id) and time.monotonic() < deadline:
        time.sleep(0.05)
    history = [first] + [g for i, g in enumerate(generations)
                         if g.id > first.id and (i == 0 or generations[i - 1] != g)]
    ids = [g.id for g in history]
    assert ids == list(range(first.id, first.id + len(ids))), f"a generation lost: {ids}"
    for node_id in joiners:  # admitted once, then a member of every later generation
        with_it = [g.id for g in history if node_id in g.node_ids]
        assert with_it == list(range(with_it[0], ids[-1] + 1)), (node_id, ids, with_it)
    for g in history:
        assert len(set(g.node_ids)) == len(g.node_ids), f"a node listed twice: {g}"


@pytest.mark.timeout(60)
def test_a_follower_reads_the_control_keys_again_only_after_they_change(
        etcd_server: Any) -> None:
    # Every follower wakes for its keepalive (TTL/3); re-reading the generation then, with
    # hundreds of followers, was most of etcd's load. Its watch says whether to.
    job = Job("etcd", etcd_server, target_np=2, max_np=4)
    try:
        job.agents_for(2)
        first = job.wait_generation(0)
        leader = job.leader()
        follower = next(a for a in job.agents if a is not leader)
        ops = follower.backend.ops  # type: ignore[attr-defined]
        time.sleep(0.5)
        reads, keepalives = ops["get_prefix"], ops["refresh_lease"]
        time.sleep(3.0)  # several keepalives at a TTL of 2 s
        assert ops["refresh_lease"] > keepalives, "the follower did not wake to keep its lease"
        assert ops["get_prefix"] == reads, "the follower read control keys nobody changed"
        job.agent("n2", order=2)
        gen = follower.wait_for_generation(first.id, EVENT_TIMEOUT)
        assert gen.node_ids == ["n0", "n1", "n2"]
        assert ops["get_prefix"] > reads
        assert follower.control.generation == gen
    finally:
        job.close()


@pytest.mark.timeout(60)
def test_joiners_beyond_max_np_wait(make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=2, max_np=3)
    job.agents_for(2)
    job.wait_generation(0)
    job.agent("n2", order=2)
    job.agent("n3", order=3)
    gen = job.agents[2].wait_for_generation(0, EVENT_TIMEOUT)
    assert gen.node_ids == ["n0", "n1", "n2"]
    with pytest.raises(RendezvousTimeoutError):
        job.agents[3].wait_for_generation(0, 0.6)
    job.agents[0].stop()
    gen = job.agents[3].wait_for_generation(1, EVENT_TIMEOUT)
    assert gen.node_ids == ["n1", "n2", "n3"]


# -- below min_np ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_below_min_np_waits_then_fails_with_the_elastic_timeout_message(
        make_job: Callable[..., Job]) -> None:
    job = make_job(min_np=2, target_np=2, max_np=3, elastic_timeout=1.0)
    job.agents_for(2)
    job.wait_generation(0)
    left_at = time.monotonic()
    job.agents[1].stop(reason="left")
    control = job.wait_for("status failed",
                           lambda c: c.status is not None and c.status.state == "failed")
    assert time.monotonic() - left_at >= 1.0  # it waited for the elastic timeout first
    assert control.status is not None
    assert "fewer than min_np=2" in control.status.message
    assert "elastic timeout of 1 s" in control.status.message
    assert control.generation is not None and control.generation.id == 0  # nothing published
    with pytest.raises(RendezvousClosedError, match="failed: the job had 1 worker"):
        job.agents[0].wait_for_generation(0, EVENT_TIMEOUT)


@pytest.mark.timeout(60)
def test_a_joiner_rescues_a_job_below_min_np(make_job: Callable[..., Job]) -> None:
    job = make_job(min_np=2, target_np=2, max_np=3, elastic_timeout=20.0)
    job.agents_for(2)
    job.wait_generation(0)
    job.agents[1].stop(reason="left")
    time.sleep(0.5)
    assert job.generation() is not None and job.generation().id == 0  # type: ignore[union-attr]
    job.agent("n9", order=9)
    gen = job.agents[0].wait_for_generation(0, EVENT_TIMEOUT)
    assert gen.node_ids == ["n0", "n9"]
    assert job.control().status == JobStatus("running")


@pytest.mark.timeout(60)
def test_start_timeout_fails_a_job_that_never_reaches_min_np(
        make_job: Callable[..., Job]) -> None:
    job = make_job(min_np=3, target_np=3, max_np=3, start_timeout=0.5)
    job.agents_for(2)
    control = job.wait_for("status failed",
                           lambda c: c.status is not None and c.status.state == "failed")
    assert control.status is not None
    assert "only 2 of the 3 requested workers" in control.status.message
    with pytest.raises(RendezvousClosedError, match="only 2 of the 3"):
        job.agents[0].wait_for_generation(-1, EVENT_TIMEOUT)


# -- waiting ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_wait_for_generation_times_out_before_the_first_generation(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=3)
    agent = job.agent("lonely")
    started = time.monotonic()
    with pytest.raises(RendezvousTimeoutError) as info:
        agent.wait_for_generation(-1, 0.5)
    assert 0.5 <= time.monotonic() - started < 3.0
    message = str(info.value)
    assert "lonely" in message and job.settings.job in message and "0.5 s" in message
    assert "latest generation: none" in message
    assert isinstance(info.value, TimeoutError)


@pytest.mark.timeout(60)
def test_wait_for_generation_times_out_naming_the_latest_generation(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=2, max_np=2)
    job.agents_for(2)
    job.wait_generation(0)
    extra = job.agent("late")
    thread, out = in_thread(lambda: extra.wait_for_generation(-1, 0.7))
    thread.join(10)
    error = out.get("error")
    assert isinstance(error, RendezvousTimeoutError), out
    message = str(error)
    assert "late" in message and "0.7 s" in message
    assert "latest generation: 0" in message and "['n0', 'n1']" in message


@pytest.mark.timeout(30)
def test_wait_for_generation_returns_at_once_when_already_a_member(
        make_job: Callable[..., Job]) -> None:
    job = make_job(target_np=1)
    agent = job.agent("solo")
    gen = agent.wait_for_generation(-1, EVENT_TIMEOUT)
    started = time.monotonic()
    assert agent.wait_for_generation(-1, 0.0) == gen
    assert time.monotonic() - started < 0.5
    with pytest.raises(RendezvousTimeoutError):
        agent.wait_for_generation(gen.id, 0.0)
