"""Rendezvous at scale: N simulated nodes, each a `NodeAgent` on its own thread, on etcd.

    python benchmarks/rendezvous_scale.py [--nodes 500] [--candidates 3] [--procs 10]
    python benchmarks/rendezvous_scale.py --cluster 3 --nodes 2000 --lease-ttl 30 --poll 2

Starts an `EmbeddedEtcd` (or, with `--cluster N`, a real N-member etcd cluster on
loopback ports, each simulation process listing the members in a rotated order so
their load spreads over the members, as a deployment would), spreads the nodes over
a few worker processes (one Python process cannot run hundreds of agents in time: every
agent's keepalive, control read and watch are Python work under one GIL), and measures

- formation: time from "start" until a generation with all N nodes is published, and
  the etcd requests that cost;
- steady state: etcd requests per second (keepalives, control reads, watches) while
  nothing changes, and whether any lease was lost;
- failure: time from killing 10% of the nodes (threads stopped without deregistering,
  so their leases run out) to the first generation without them, and to the first one
  without any of them.

Only a few nodes are leader candidates (`--candidates`): a candidate that does not lead
still reads the job's whole key range (every registration) whenever it wakes, which
costs O(N) per wake-up and O(N^2) for the job; a follower reads only the control keys
(whose generation record is O(N) too, but one key). Run `--candidates all` to see that.

Prints one plain-text table. Meant to finish within three minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from rendezvous.agent import ControlState, NodeAgent, read_control
from rendezvous.embedded import EmbeddedEtcd
from rendezvous.errors import RendezvousConnectionError
from rendezvous.etcd import EtcdBackend, parse_endpoints
from rendezvous.generation import NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.local_cluster import LocalEtcdCluster
from rendezvous.settings import RendezvousSettings

JOB = "scale"
PREFIX = "bench"
REGISTER_THREADS = 8  # concurrent registrations per worker process
REPLY_TIMEOUT = 60.0  # seconds a worker may take to answer a command
# Agents per worker process: with many more, GIL contention delays keepalives (measured
# on 2 cores: 100 per process renewed ~150 of 300 leases/s, 50 per process ~210).
NODES_PER_PROCESS = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- worker processes -------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    order: int
    candidate: bool


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _worker(conn: Connection, url: str, settings: RendezvousSettings,
            specs: Sequence[NodeSpec], log_level: int) -> None:
    """Run the agents of `specs` in this process and answer the driver's commands."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(message)s")
    backend = EtcdBackend.from_url(url, timeout=30.0)
    agents = {
        s.node_id: NodeAgent(
            backend, settings,
            NodeInfo(node_id=s.node_id, host=f"sim-host-{s.order // 4}", addr="127.0.0.1",
                     store_port=20000 + s.order, order=s.order),
            candidate=s.candidate)
        for s in specs
    }
    conn.send(("ready", len(agents)))
    while True:
        command, arg = conn.recv()
        if command == "start":
            started = time.monotonic()
            with ThreadPoolExecutor(REGISTER_THREADS) as pool:
                failures = [str(e) for e in pool.map(_start, agents.values()) if e]
            conn.send(("started", time.monotonic() - started, failures[:3]))
        elif command == "stats":
            conn.send(("stats", dict(backend.ops), _process_cpu(), threading.active_count(),
                       sum(1 for a in agents.values() if a.error is not None),
                       backend.failovers))
        elif command == "kill":
            for node_id in arg:
                agents[node_id]._stop.set()  # no more keepalives; no deregistration
            conn.send(("killed", len(arg)))
        elif command == "stop":
            for agent in agents.values():
                agent._stop.set()
            for agent in agents.values():
                if agent._thread is not None:
                    agent._thread.join(timeout=10)
            backend.close()
            conn.send(("stopped", sum(1 for a in agents.values()
                                      if a._thread is not None and a._thread.is_alive())))
            return


def _start(agent: NodeAgent) -> str | None:
    try:
        agent.start()
    except Exception as exc:  # noqa: BLE001 - reported to the driver
        return f"{agent.node_id}: {exc}"
    return None


class Worker:
    """The driver's handle on one worker process."""

    def __init__(self, ctx: Any, url: str, settings: RendezvousSettings,
                 specs: Sequence[NodeSpec], log_level: int) -> None:
        self.specs = list(specs)
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, url, settings,
                                                         self.specs, log_level), daemon=True)
        self.process.start()
        child.close()

    def send(self, command: str, arg: Any = None) -> None:
        self.conn.send((command, arg))

    def reply(self, timeout: float = REPLY_TIMEOUT) -> tuple[Any, ...]:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"worker pid {self.process.pid} did not answer in {timeout:g} s")
        return self.conn.recv()

    def request_stop(self) -> None:
        try:
            self.send("stop")
        except (OSError, EOFError):
            pass

    def close(self) -> None:
        """Wait for the worker to stop its agents (after `request_stop`), then reap it."""
        try:
            self.reply(30.0)
        except (OSError, EOFError, RuntimeError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


@dataclass
class Stats:
    ops: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0  # worker processes' CPU seconds
    etcd_cpu: float = 0.0
    threads: int = 0
    failed_agents: int = 0
    at: float = 0.0
    failovers: int = 0

    def __sub__(self, other: Stats) -> Stats:
        keys = set(self.ops) | set(other.ops)
        return Stats({k: self.ops.get(k, 0) - other.ops.get(k, 0) for k in keys},
                     self.cpu - other.cpu, self.etcd_cpu - other.etcd_cpu, self.threads,
                     self.failed_agents, self.at - other.at)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _etcd_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def collect(workers: Sequence[Worker], etcd: Any) -> Stats:
    for worker in workers:
        worker.send("stats")
    total = Stats(at=time.monotonic(), etcd_cpu=sum(_etcd_cpu(pid) for pid in _etcd_pids(etcd)))
    for worker in workers:
        _, ops, cpu, threads, failed, failovers = worker.reply()
        total.failovers += failovers
        for op, count in ops.items():
            total.ops[op] = total.ops.get(op, 0) + count
        total.cpu += cpu
        total.threads += threads
        total.failed_agents += failed
    return total


def _etcd_pids(etcd: Any) -> list[int]:
    """The etcd processes to charge CPU to: the embedded one's guard, or every member."""
    if isinstance(etcd, LocalEtcdCluster):
        return [pid for i in range(len(etcd.members)) if (pid := etcd.etcd_pid(i))]
    return [etcd.pid] if etcd.pid else []


def _rotated(url: str, shift: int) -> str:
    """The same members, listed from the `shift`-th on: that process prefers another."""
    endpoints = [e.label for e in parse_endpoints(url)]
    shift %= len(endpoints)
    return "etcd://" + ",".join(endpoints[shift:] + endpoints[:shift])


# -- watching the generations ------------------------------------------------------------


class Observer:
    """Records every control-key change (its own etcd client; not counted in the totals)."""

    def __init__(self, backend: EtcdBackend, keys: JobKeys) -> None:
        self.backend = backend
        self.keys = keys
        self.history: list[tuple[float, ControlState]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: ControlState | None = None
        while not self._stop.is_set():
            try:
                control, revision = read_control(self.backend, self.keys)
            except RendezvousConnectionError:  # a loaded cluster: look again
                self._stop.wait(0.2)
                continue
            if control != last:
                last = control
                with self._cond:
                    self.history.append((time.monotonic(), control))
                    self._cond.notify_all()
            try:
                self.backend.wait_for_change(self.keys.control, revision, 0.5)
            except RendezvousConnectionError:
                self._stop.wait(0.2)

    def wait(self, predicate: Any, since: float, timeout: float) -> tuple[float, ControlState]:
        """The first recorded state after `since` for which `predicate` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, control in self.history:
                    if at >= since and predicate(control):
                        return at, control
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    latest = self.history[-1][1] if self.history else None
                    raise TimeoutError(f"not reached within {timeout:g} s; latest: "
                                       f"{_describe(latest)}")
                self._cond.wait(min(remaining, 0.5))

    def generations_between(self, start: float, end: float) -> list[int]:
        with self._cond:
            ids = [c.generation.id for at, c in self.history
                   if start <= at <= end and c.generation is not None]
        return sorted(set(ids))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _describe(control: ControlState | None) -> str:
    if control is None or control.generation is None:
        return "no generation"
    gen = control.generation
    status = control.status.state if control.status else "-"
    return f"generation {gen.id} with {gen.size} members ({status})"


# -- the run ----------------------------------------------------------------------------


class _Skip(Exception):
    """The failure phase is not wanted."""


def _specs(nodes: int, candidates: int) -> list[NodeSpec]:
    return [NodeSpec(f"node-{i:04d}", i, i < candidates) for i in range(nodes)]


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    nodes = args.nodes
    candidates = nodes if args.candidates == "all" else min(int(args.candidates), nodes)
    procs = args.procs or max(1, min(16, (nodes + NODES_PER_PROCESS - 1) // NODES_PER_PROCESS))
    settings = RendezvousSettings(
        job=JOB, prefix=PREFIX, min_np=1, target_np=nodes, max_np=nodes,
        lease_ttl=args.lease_ttl, settle_window=args.settle, poll_interval=args.poll,
        start_timeout=600.0, elastic_timeout=600.0,
    )
    keys = JobKeys(PREFIX, JOB)
    specs = _specs(nodes, candidates)
    kill_count = max(1, round(nodes * max(args.kill_fraction, 0.0)))
    followers = {s.node_id for s in specs if not s.candidate}
    rows: list[list[str]] = []
    notes: list[str] = []
    where = (f"a {args.cluster}-member etcd cluster" if args.cluster > 1
             else "one embedded etcd")
    print(f"rendezvous scale: {nodes} nodes ({candidates} leader candidates) on "
          f"{procs} worker process(es), {where}, {os.cpu_count()} CPU(s); lease TTL "
          f"{settings.lease_ttl} s, settle window {settings.settle_window:g} s, "
          f"poll interval {settings.poll_interval:g} s", flush=True)

    started_all = time.monotonic()
    ctx = mp.get_context("spawn")
    # Raft timing as etcd's defaults (100 ms heartbeat, 1 s election): a loaded simulation
    # host must not make the members elect a new leader over and over.
    etcd: Any = (LocalEtcdCluster(args.cluster, heartbeat_ms=100, election_ms=1000)
                 if args.cluster > 1 else EmbeddedEtcd())
    workers: list[Worker] = []
    observer: Observer | None = None
    try:
        log_level = logging.INFO if args.verbose else logging.ERROR
        workers = [Worker(ctx, _rotated(etcd.url, i), settings, specs[i::procs], log_level)
                   for i in range(procs)]
        for worker in workers:
            worker.reply()
        observer = Observer(EtcdBackend.from_url(etcd.url, timeout=30.0), keys)
        rows.append(["setup", "etcd + worker processes ready",
                     f"{time.monotonic() - started_all:.1f} s"])

        # 1. formation
        before = collect(workers, etcd)
        t0 = time.monotonic()
        for worker in workers:
            worker.send("start")
        registration = 0.0
        for worker in workers:
            _, seconds, failures = worker.reply(max(REPLY_TIMEOUT * 2, args.phase_timeout))
            registration = max(registration, seconds)
            if failures:
                notes.append(f"registration failures: {failures}")
        at, control = observer.wait(
            lambda c: c.generation is not None and c.generation.size == nodes, t0,
            args.phase_timeout)
        formed = time.monotonic()
        assert control.generation is not None
        gen_id = control.generation.id
        time.sleep(max(2 * settings.settle_window, 1.0))  # stable: nothing newer follows
        _, latest = observer.history[-1]
        stable = latest.generation is not None and latest.generation.id == gen_id
        after_formation = collect(workers, etcd)
        cost = after_formation - before
        gens = observer.generations_between(t0, formed)
        rows += [
            ["formation", "all agents registered (slowest process)", f"{registration:.1f} s"],
            ["formation", f"generation with all {nodes} nodes published",
             f"{at - t0:.1f} s (generation {gen_id}, {len(gens)} published)"],
            ["formation", "stable afterwards", "yes" if stable else
             f"NO (now {_describe(latest)})"],
            ["formation", "etcd requests until then", f"{cost.total:,} "
             f"({cost.total / nodes:.1f} per node)"],
        ]

        # 2. steady state
        s0 = collect(workers, etcd)
        time.sleep(args.steady)
        s1 = collect(workers, etcd)
        steady = s1 - s0
        seconds = steady.at
        keepalives = steady.ops.get("refresh_lease", 0) / seconds
        due = nodes / (settings.lease_ttl / 3.0)  # each agent renews every TTL/3
        lost = steady.ops.get("grant_lease", 0)
        rows += [
            ["steady", "etcd requests", f"{_rate(steady.total, seconds)} "
             f"({steady.total / seconds / nodes:.2f}/s per node)"],
            ["steady", "  keepalives (refresh_lease)",
             f"{keepalives:,.0f}/s (on time would be {due:,.0f}/s)"],
            ["steady", "  control reads (get_prefix)",
             _rate(steady.ops.get("get_prefix", 0), seconds)],
            ["steady", "  watches (wait_for_change)",
             _rate(steady.ops.get("wait_for_change", 0), seconds)],
            ["steady", "leases lost (re-registrations)", str(lost)],
            ["steady", "CPU: workers / etcd" + (" (all members)" if args.cluster > 1 else ""),
             f"{100 * steady.cpu / seconds:.0f}% / "
             f"{100 * steady.etcd_cpu / seconds:.0f}% of one core"],
            ["steady", "failovers between members", str(steady.failovers)],
            ["steady", "threads in worker processes", str(s1.threads)],
        ]
        cores = os.cpu_count() or 1
        if lost or keepalives < 0.8 * due:
            notes.append(
                f"the simulation host is CPU-bound: {nodes} Python agents on {cores} core(s) "
                f"used {100 * steady.cpu / seconds:.0f}% of one core and renewed only "
                f"{keepalives:,.0f} of {due:,.0f} leases/s ({lost} lease(s) lost); keepalives "
                "run late, a late one loses its lease, and each lost lease costs generations. "
                f"etcd itself used {100 * steady.etcd_cpu / seconds:.0f}% of one core. The "
                f"agents are spread over {procs} processes to sidestep the GIL, not over more "
                "cores: for clean figures use fewer --nodes, a longer --lease-ttl, or a "
                "machine with more cores")

        if args.kill_fraction <= 0:
            raise _Skip
        # 3. kill 10% of the current members (followers, spread over the ranks; the
        # leader survives), then wait for the generations that drop them.
        _, current = observer.history[-1]
        assert current.generation is not None
        gen_id = current.generation.id
        # Followers first; candidates too (never the leader) when there are too few.
        members = sorted((n for n in current.generation.node_ids if n != current.leader),
                         key=lambda n: (n not in followers, n))
        pool = members[:max(kill_count, sum(1 for n in members if n in followers))]
        step = max(1, len(pool) // kill_count)
        victims = set(pool[::step][:kill_count])
        k0 = collect(workers, etcd)
        t_kill = time.monotonic()
        for worker in workers:
            worker.send("kill", [s.node_id for s in worker.specs if s.node_id in victims])
        for worker in workers:
            worker.reply()
        first_at, _ = observer.wait(
            lambda c: c.generation is not None and c.generation.id > gen_id
            and bool(victims - set(c.generation.node_ids)), t_kill, args.phase_timeout)
        all_at, final = observer.wait(
            lambda c: c.generation is not None
            and not victims & set(c.generation.node_ids), t_kill, args.phase_timeout)
        assert final.generation is not None
        k1 = collect(workers, etcd)
        killed_cost = k1 - k0
        rows += [
            ["failure", f"killed {len(victims)} nodes ({100 * len(victims) / nodes:.0f}%), "
             f"{len(victims - followers)} of them candidates",
             f"lease TTL {settings.lease_ttl} s"],
            ["failure", "first generation without a killed node", f"{first_at - t_kill:.1f} s"],
            ["failure", "first generation without any of them", f"{all_at - t_kill:.1f} s "
             f"(generation {final.generation.id}, {final.generation.size} members, "
             f"{final.generation.id - gen_id} published)"],
            ["failure", "etcd requests until then", f"{killed_cost.total:,}"],
            ["failure", "live nodes missing from it (lost leases)",
             str(nodes - len(victims) - final.generation.size)],
        ]
        if s1.failed_agents or k1.failed_agents:
            notes.append(f"{k1.failed_agents} agent(s) failed (see --verbose)")
    except _Skip:
        notes.append("failure phase skipped (--kill-fraction 0)")
    except (TimeoutError, RuntimeError) as exc:
        notes.append(f"aborted: {exc}")
    finally:
        if observer is not None:
            observer.close()
        for worker in workers:  # all at once: each takes up to one wait-for-change to stop
            worker.request_stop()
        for worker in workers:
            worker.close()
        if isinstance(etcd, LocalEtcdCluster):
            etcd.close()
        else:
            etcd.stop()
        rows.append(["total", "wall time (with cleanup)",
                     f"{time.monotonic() - started_all:.1f} s"])

    print(_table(rows, ["phase", "measure", "value"]))
    for note in notes:
        print(f"note: {note}")
    return 1 if any(n.startswith("aborted") for n in notes) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=500, help="simulated nodes (default 500)")
    parser.add_argument("--candidates", default="3",
                        help="leader candidates among them, or 'all' (default 3)")
    parser.add_argument("--procs", type=int, default=0,
                        help="worker processes (default: one per 50 nodes, at most 16)")
    parser.add_argument("--lease-ttl", type=int, default=5, help="lease TTL in s (default 5)")
    parser.add_argument("--settle", type=float, default=0.5, help="settle window in s")
    parser.add_argument("--poll", type=float, default=0.5, help="poll interval in s")
    parser.add_argument("--steady", type=float, default=8.0,
                        help="seconds of steady state to measure (default 8)")
    parser.add_argument("--kill-fraction", type=float, default=0.1,
                        help="share of the nodes to kill (default 0.1; 0: skip that phase)")
    parser.add_argument("--phase-timeout", type=float, default=45.0,
                        help="give up on a phase after this many seconds (default 45)")
    parser.add_argument("--cluster", type=int, default=1,
                        help="etcd members: 1 (default) an embedded etcd; N > 1 a real "
                        "N-member cluster on loopback ports")
    parser.add_argument("--verbose", action="store_true", help="log the agents' INFO messages")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error(f"--nodes {args.nodes} must be at least 2")
    if args.candidates != "all" and not (args.candidates.isdigit()
                                         and int(args.candidates) >= 1):
        parser.error(f"--candidates {args.candidates!r} must be a number >= 1 or 'all'")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
