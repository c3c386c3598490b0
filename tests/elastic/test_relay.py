"""The relay transport: real processes exchange through a real `RelayHub` (ZeroMQ over
loopback TCP) and get the same results Gloo gives; a dead hub fails a collective in
time (HorovodInternalError through the engine's wait), never hangs."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import socket
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from elastic.core.relay import RelayHub, RelayProcessGroup, parse_endpoint, probe_reachable

pytestmark = pytest.mark.timeout(120)
def _member(endpoint: str, rank: int, size: int, results: Any, store_port: int,
            reachable: bool) -> None:
    store = None
    if store_port:
        store = dist.TCPStore("127.0.0.1", store_port, None, False,
                              timeout=datetime.timedelta(seconds=30))
    group = RelayProcessGroup(endpoint, "test/g0/", rank, size, timeout=30, relay_timeout=10,
                              store=store, reachable=reachable, bind_host="127.0.0.1")
    out: dict[str, Any] = {}
    t = torch.arange(5, dtype=torch.float32) * (rank + 1)
    group.allreduce([t]).wait()
    out["sum"] = t.tolist()
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    m = torch.tensor([rank, -rank], dtype=torch.int64)
    group.allreduce([m], opts).wait()
    out["max"] = m.tolist()
    parts = [torch.empty(2, dtype=torch.float64) for _ in range(size)]
    group.allgather([parts], [torch.full((2,), float(rank), dtype=torch.float64)]).wait()
    out["gather"] = [p.tolist() for p in parts]
    b = torch.full((3,), 7.0) if rank == 1 else torch.zeros(3)
    bopts = dist.BroadcastOptions()
    bopts.rootRank = 1
    group.broadcast([b], bopts).wait()
    out["bcast"] = b.tolist()
    group.barrier().wait()
    # alltoall: rank r sends (r+1) rows of value 10*r+d to rank d
    send = torch.cat([torch.full((rank + 1,), 10.0 * rank + d) for d in range(size)])
    recv = torch.empty(sum(r + 1 for r in range(size)))
    group.alltoall_base(recv, send, [r + 1 for r in range(size)], [rank + 1] * size,
                        dist.AllToAllOptions()).wait()
    out["a2a"] = recv.tolist()
    # the future path the engine takes for groups that are not Gloo; many in flight
    works = [group.allreduce([torch.ones(1) * i]) for i in range(20)]
    for w in works:
        w.get_future().wait()
    out["future"] = [w.get_future().value()[0].item() for w in works]
    results.put((rank, out))
    group.barrier().wait()  # nobody closes while another still needs its parts
    group.abort()


@pytest.mark.parametrize("reachable", [
    (), (True, True, False, False), (False, True, False, True)],
    ids=["all through the hub", "2 of 4 listen", "2 of 4 listen, interleaved"])
def test_collectives_match_their_definition(reachable: tuple[bool, ...]) -> None:
    size = len(reachable) or 3
    hub = RelayHub("127.0.0.1")
    server = None
    if reachable:
        server = dist.TCPStore("127.0.0.1", 0, None, True,
                               timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(
        hub.endpoint, r, size, results, server.port if server else 0,
        reachable[r] if reachable else False)) for r in range(size)]
    try:
        for p in procs:
            p.start()
        got = dict(results.get(timeout=90) for _ in range(size))
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
        hub.stop()
    for rank in range(size):
        out = got[rank]
        assert out["sum"] == [float(i * size * (size + 1) // 2) for i in range(5)]
        assert out["max"] == [size - 1, 0]
        assert out["gather"] == [[float(r)] * 2 for r in range(size)]
        assert out["bcast"] == [7.0] * 3
        assert out["a2a"] == [10.0 * src + rank for src in range(size)
                              for _ in range(src + 1)]
        assert out["future"] == [float(i * size) for i in range(20)]


def _hub_process(port_queue: Any) -> None:
    hub = RelayHub("127.0.0.1")
    port_queue.put(hub.endpoint)
    while True:
        time.sleep(1)


def test_a_dead_hub_fails_the_collective_within_the_relay_timeout() -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_hub_process, args=(q,))
    proc.start()
    try:
        endpoint = q.get(timeout=30)
        group = RelayProcessGroup(endpoint, "dead/g0/", 0, 2, timeout=60, relay_timeout=3)
        work = group.allreduce([torch.ones(4)])  # rank 1 never comes: the hub holds it
        time.sleep(1.5)
        assert not work.is_completed()  # the hub is alive and pongs: no false failure
        os.kill(proc.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="did not answer for 3 s"):
            work.wait(datetime.timedelta(seconds=30))
        assert time.monotonic() - started < 10
        # the engine's wait turns it into HorovodInternalError
        import threading

        from elastic.core.transport import wait_interruptibly
        from elastic.errors import HorovodInternalError

        with pytest.raises(HorovodInternalError, match="relay"):
            wait_interruptibly(group.barrier(), threading.Event(), "a barrier")
        group.abort()
    finally:
        proc.kill()
        proc.join(10)


def test_the_hub_refuses_a_second_claim_on_a_rank() -> None:
    hub = RelayHub("127.0.0.1")
    try:
        a = RelayProcessGroup(hub.endpoint, "claim/", 0, 2, timeout=10, relay_timeout=5)
        b = RelayProcessGroup(hub.endpoint, "claim/", 0, 2, timeout=10, relay_timeout=5)
        wa = a.barrier()
        time.sleep(0.5)
        wb = b.barrier()
        with pytest.raises(RuntimeError, match="already held by another connection"):
            wb.wait(datetime.timedelta(seconds=10))
        assert not wa.is_completed()
        a.abort()
        b.abort()
    finally:
        hub.stop()


def test_probe_says_whether_the_hub_can_dial_back() -> None:
    hub = RelayHub("127.0.0.1")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    try:
        assert probe_reachable(hub.endpoint, "127.0.0.1", listener.getsockname()[1])
        assert not probe_reachable(hub.endpoint, "127.0.0.1", closed.getsockname()[1])
        # an address other than the one the hub sees is never dialled
        assert not probe_reachable(hub.endpoint, "10.255.255.1", listener.getsockname()[1])
    finally:
        listener.close()
        closed.close()
        hub.stop()


def test_relay_address_is_validated() -> None:
    assert parse_endpoint("10.0.0.1:5555") == ("10.0.0.1", 5555)
    for bad in ("10.0.0.1", "host:0", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_endpoint(bad)


def test_a_collective_past_its_timeout_fails_naming_the_silent_ranks() -> None:
    hub = RelayHub("127.0.0.1")
    try:
        group = RelayProcessGroup(hub.endpoint, "late/g0/", 0, 3, timeout=2, relay_timeout=30)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"did not complete within 2 s: nothing arrived "
                           r"from ranks \[1, 2\]"):
            group.allreduce([torch.ones(2)]).wait(datetime.timedelta(seconds=30))
        assert time.monotonic() - started < 10
        group.abort()
    finally:
        hub.stop()


def test_a_bad_address_in_the_store_is_refused_naming_the_rank() -> None:
    store = dist.HashStore()
    store.set("1", "not-an-address")
    with pytest.raises(RuntimeError, match="rank 1 published an invalid relay address"):
        RelayProcessGroup("127.0.0.1:9", "bad/", 0, 2, timeout=5, relay_timeout=5,
                          store=store, reachable=False)
