"""A node that is in the published generation but cannot connect it is told what could
not be reached (the store, or which peers), from which node and in which generation,
not that it "was not admitted".

The test plays the leader: it holds the leader key, so the worker's agent only follows,
and it publishes generations by hand that the worker cannot connect.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from elastic.core.transport import connect_store
from rendezvous import backend_from_url
from rendezvous.backend import RendezvousBackend
from rendezvous.generation import Generation, JobStatus, Member, NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.harness import Workers, unique_job, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

INIT = "import elastic.torch as hvd; hvd.init(); print('initialised', flush=True)"
LIMIT = 60.0


def dead_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeLeader:
    """Holds the leader key of `job` and publishes the generations a test dictates."""

    def __init__(self, etcd_url: str, job: str) -> None:
        self.backend: RendezvousBackend = backend_from_url(etcd_url)
        self.keys = JobKeys(DEFAULT_PREFIX, job)
        lease = self.backend.grant_lease(120)
        assert self.backend.compare_and_swap(self.keys.leader, 0, b"test-leader", lease=lease)

    def registration(self, node_id: str, timeout: float = 30.0) -> NodeInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kv = self.backend.get(self.keys.node(node_id))
            if kv is not None:
                return NodeInfo.from_json(kv.value)
            time.sleep(0.1)
        raise AssertionError(f"node {node_id} never registered")

    def publish(self, gen: Generation) -> None:
        self.backend.put(self.keys.generation, gen.to_json())
        self.backend.put(self.keys.status, JobStatus("running").to_json())


def start(etcd_url: str, job: str, tmp_path: Path, elastic: bool) -> Workers:
    env = worker_env(etcd_url, job, 1, min_np=1, max_np=2 if elastic else 1, extra={
        "HORDE_START_TIMEOUT": "3", "HORDE_ELASTIC_TIMEOUT": "3",
        "HORDE_COLLECTIVE_TIMEOUT": "3"})
    workers = Workers()
    workers.start([sys.executable, "-c", INIT], env, tmp_path / "worker.log", node_id="w0")
    return workers


def finish(workers: Workers) -> str:
    try:
        codes = workers.wait(LIMIT)
    finally:
        workers.kill_all()
    out = workers.output(0)
    assert codes == [1], f"exit code {codes}\n{out}"
    assert "initialised" not in out
    return out


def last_error(output: str) -> str:
    """The last line of the traceback: what the user reads first."""
    lines = [line for line in output.splitlines() if "Error:" in line]
    assert lines, output
    return lines[-1]


def test_a_store_at_a_dead_address_is_named(etcd_server: Any, tmp_path: Path) -> None:
    job = unique_job("store")
    leader = FakeLeader(etcd_server.url, job)
    workers = start(etcd_server.url, job, tmp_path, elastic=False)
    try:
        info = leader.registration("w0")
        port = dead_port()
        leader.publish(Generation(0, (Member("w0", info.host, info.addr, lease=info.lease),),
                                  store_host="127.0.0.1", store_port=port))
    finally:
        output = finish(workers)
    error = last_error(output)
    assert error.startswith("elastic.errors.GenerationUnreachableError"), error
    assert f"could not reach the store of generation 0 of job {job} at 127.0.0.1:{port}" \
        in error, error
    assert "node w0 (rank 0, address 127.0.0.1)" in error, error
    assert "was not admitted" not in output, output


def test_peers_that_never_arrive_are_named(etcd_server: Any, tmp_path: Path) -> None:
    """Elastic: the node reports the failure, waits for another generation, and when
    none comes it raises the connect failure (the wait's timeout as its cause)."""
    job = unique_job("peer")
    leader = FakeLeader(etcd_server.url, job)
    workers = start(etcd_server.url, job, tmp_path, elastic=True)
    try:
        info = leader.registration("w0")
        ghost = Member("ghost", "elsewhere", "192.0.2.7")
        leader.publish(Generation(0, (Member("w0", info.host, info.addr, lease=info.lease),
                                      ghost), store_host=info.addr, store_port=info.store_port))
    finally:
        output = finish(workers)
    error = last_error(output)
    assert error.startswith("elastic.errors.GenerationUnreachableError"), error
    assert (f"node w0 (rank 0, address 127.0.0.1) could not connect the process group of "
            f"generation 0 of job {job}: peers that never reached the store within 3 s: "
            "rank 1 (node ghost, address 192.0.2.7)") in error, error
    # the failure was reported to the leader, and the wait for a next one is the cause
    marker = leader.backend.get(leader.keys.ready_node("w0"))
    assert marker is not None and json.loads(marker.value) == {"generation": 0, "reset": True}
    assert "RendezvousTimeoutError: node w0 was not admitted" in output, output


def test_a_peer_that_reached_the_store_but_cannot_be_connected_is_named(
        etcd_server: Any, tmp_path: Path) -> None:
    """The ghost announces itself in the generation's store but never connects directly
    (as a peer behind a NAT would): the error says the store was fine and names it."""
    job = unique_job("direct")
    leader = FakeLeader(etcd_server.url, job)
    workers = start(etcd_server.url, job, tmp_path, elastic=False)
    try:
        info = leader.registration("w0")
        leader.publish(Generation(0, (Member("w0", info.host, info.addr, lease=info.lease),
                                      Member("ghost", "elsewhere", "192.0.2.8")),
                                  store_host=info.addr, store_port=info.store_port))
        store = connect_store(info.addr, info.store_port, 10.0)
        store.set(f"{job}/g0/arrived/1", "192.0.2.8")
    finally:
        output = finish(workers)
    error = last_error(output)
    assert (f"could not connect the process group of generation 0 of job {job}: every peer "
            "reached the store, so a direct connection failed between this node and its "
            "peers (rank 1 (node ghost, address 192.0.2.8))") in error, error


PARK = """
import time
import elastic.torch as hvd
from elastic.core import session
def init():
    hvd.init()
    print("generation", hvd.runtime.context().generation.id, "rank", hvd.rank(), flush=True)
init()
hvd.shutdown()
print("parked", flush=True)
agent = session._context.agent
parked_in = session._context.generation.id
while agent.control.generation.id == parked_in:  # wait for the leader's next generation
    time.sleep(0.05)
init()
hvd.shutdown()
"""


def test_a_node_outside_collectives_answers_a_reset_as_ready(etcd_server: Any,
                                                             tmp_path: Path) -> None:
    """A node that is connecting or shut down is in no collective: a reset of its
    generation needs only its ready marker, which it gives at once (the leader need not
    wait `reset_timeout` and evict it as unresponsive); its next `init()` joins the
    newest generation."""
    job = unique_job("ready")
    leader = FakeLeader(etcd_server.url, job)
    env = worker_env(etcd_server.url, job, 1, extra={"HORDE_COLLECTIVE_TIMEOUT": "60"})
    workers = Workers()
    workers.start([sys.executable, "-c", PARK], env, tmp_path / "worker.log", node_id="w0")

    def until(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + 30  # well under the collective timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out: {what}\n{workers.output(0)}"
            assert workers.procs[0].poll() is None, workers.output(0)
            time.sleep(0.1)

    def reset_answered(generation: int) -> None:
        leader.backend.put(leader.keys.reset, json.dumps(
            {"generation": generation, "by": "ghost"}).encode())
        def ready_after() -> int | None:
            kv = leader.backend.get(leader.keys.ready_node("w0"))
            return None if kv is None else json.loads(kv.value)["generation"]

        until(lambda: ready_after() == generation,
              f"w0 ready after the reset of generation {generation}")

    try:
        info = leader.registration("w0")
        me = Member("w0", info.host, info.addr, lease=info.lease)
        ghost = Member("ghost", "elsewhere", "192.0.2.9")

        def generation(gen_id: int, *members: Member) -> Generation:
            return Generation(gen_id, (me, *members), store_host=info.addr,
                              store_port=info.store_port)

        store = connect_store(info.addr, info.store_port, 10.0)
        leader.publish(generation(0, ghost))
        until(lambda: store.check([f"{job}/g0/arrived/0"]), "w0 connecting generation 0")
        reset_answered(0)  # while connecting
        leader.publish(generation(1))
        until(lambda: "parked" in workers.output(0), "w0 connected and shut down")
        reset_answered(1)  # while shut down
        leader.publish(generation(2))
        codes = workers.wait(LIMIT)
    finally:
        workers.kill_all()
    out = workers.output(0)
    assert codes == [0], out
    assert "generation 1 rank 0\nparked\ngeneration 2 rank 0" in out, out
