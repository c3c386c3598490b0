"""How a node agent lives through an unreachable etcd (injected on the in-memory store):
it waits, says so, goes on when etcd answers, and gives up after the elastic timeout;
and it leads when its election write was applied but the answer was lost."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest

from rendezvous import MemoryBackend, RendezvousConnectionError
from rendezvous.agent import NodeAgent
from rendezvous.generation import NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.settings import RendezvousSettings

pytestmark = pytest.mark.timeout(60)


class Flaky(MemoryBackend):
    """An in-memory store that can be made unreachable, as a cluster without quorum is."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name in ("get", "get_prefix", "put", "compare_and_swap", "delete", "delete_prefix",
                    "grant_lease", "refresh_lease", "revoke_lease", "wait_for_change") \
                and super().__getattribute__("down"):
            def unreachable(*_args: Any, **_kwargs: Any) -> Any:
                raise RendezvousConnectionError("cannot reach etcd at any of its 3 members")
            return unreachable
        return attr


def _settings(**overrides: Any) -> RendezvousSettings:
    values: dict[str, Any] = dict(job=f"outage-{uuid.uuid4().hex[:8]}", lease_ttl=2,
                                  settle_window=0.1, poll_interval=0.1, elastic_timeout=0.0,
                                  min_np=1, target_np=1, max_np=1)
    values.update(overrides)
    return RendezvousSettings(**values)


def _agent(backend: MemoryBackend, settings: RendezvousSettings, node: str = "n0"
           ) -> NodeAgent:
    info = NodeInfo(node_id=node, host="h", addr="127.0.0.1", store_port=1, order=0)
    return NodeAgent(backend, settings, info)


def test_short_outage_is_waited_out_and_said(caplog: pytest.LogCaptureFixture) -> None:
    backend = Flaky()
    agent = _agent(backend, _settings(lease_ttl=10))  # the store keeps expiring leases
    agent.start()
    try:
        gen = agent.wait_for_generation(-1, 10)
        caplog.set_level(logging.WARNING, logger="rendezvous.agent")
        backend.down = True
        time.sleep(3.0)  # below the limit: max(4 lease TTLs, elastic timeout) = 40 s
        assert agent.error is None
        backend.down = False
        deadline = time.monotonic() + 5
        while "etcd answers again" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.1)
        assert "Waiting up to 40 s" in caplog.text
        assert agent.error is None and agent.control.generation == gen
    finally:
        agent.stop()


def test_outage_longer_than_the_elastic_timeout_fails_the_wait() -> None:
    backend = Flaky()
    agent = _agent(backend, _settings())
    agent.start()
    try:
        gen = agent.wait_for_generation(-1, 10)
        backend.down = True
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match="longer than the elastic timeout"):
            agent.wait_for_generation(gen.id, 30)
        assert 7.5 <= time.monotonic() - start < 20
    finally:
        backend.down = False
        agent.stop()


def test_outage_limit_follows_the_elastic_timeout() -> None:
    assert _agent(Flaky(), _settings(elastic_timeout=600)).outage_limit() == 600
    assert _agent(Flaky(), _settings(elastic_timeout=1, lease_ttl=5)).outage_limit() == 20


def test_leader_key_written_but_unanswered_is_adopted() -> None:
    """The election CAS was applied and its answer lost: the key holds this node's id on
    its own lease. The agent must lead (else nobody would, while its lease lives)."""
    backend = MemoryBackend()
    settings = _settings()
    agent = _agent(backend, settings)
    keys = JobKeys(settings.prefix, settings.job)
    original = backend.compare_and_swap

    def lost_answer(key: str, expected: int, value: bytes, lease: int = 0) -> bool:
        won = original(key, expected, value, lease)
        if key == keys.leader and won:
            return False  # applied, but the caller never heard
        return won

    backend.compare_and_swap = lost_answer  # type: ignore[method-assign]
    agent.start()
    try:
        gen = agent.wait_for_generation(-1, 10)
        assert gen.node_ids == ["n0"] and agent.is_leader
    finally:
        agent.stop()
