"""How long an elastic Horde job stops training when a worker dies or a worker joins.

    python benchmarks/recovery.py [--repeats 3] [--json PATH]

Starts its own embedded etcd, then per repeat one job with DEFAULT Horde settings:

    horderun --rendezvous URL --job NAME -np 3 --min-np 2 --max-np 4 \
        python benchmarks/workers/recovery_worker.py

Every worker appends a JSON line per completed training step (and a few other events)
to a file of its own, and commits its state every step. Once the job trains steadily,
the benchmark runs, in this order, waiting for steady training after each:

1. kill worker: SIGKILL a worker that is neither rank 0 nor the leader; measured from
   the kill to the first step that every survivor completes in the new generation;
2. join: start `horderun --join ... -np 1` with the same worker; measured from that
   process being spawned to the first step, in the grown generation, completed by every
   member (the newcomer included). Its start-up (spawn to torch and elastic.torch
   imported, model and torch optimizer built, just before `hvd.init()`) is reported
   apart: the rest is Horde's cost. The survivors train on meanwhile; how long they
   stop (their last step in the old world to the first in the grown one) is reported too;
3. kill leader: SIGKILL the leader (the node named by /horde/<job>/control/leader),
   measured as in 1;
4. join again, measured as in 2;
5. kill host: SIGKILL the launcher of that last join together with its worker, as when
   a volunteer's machine vanishes: nobody revokes the worker's lease, so the leader
   learns of the loss from the lease's expiry or from the survivors' reports.

Prints min / median / max per scenario against the 3 s goal, and where the time went
(medians of the phases, from the workers' records and the generations' creation times).
Every wait is bounded; all processes and etcd are stopped on exit or Ctrl-C.

    python benchmarks/recovery.py --etcd-cluster [--repeats 3]

runs the etcd failures instead, on a real three-member etcd cluster (loopback ports) that
every launcher and worker reaches as `etcd://m0,m1,m2` (m0 preferred):

6. kill etcd member: SIGKILL m0, the member every agent talks to; restarted once the
   job is steady again;
7. quorum loss: stop m1 and m2 for 10 s (m0 alone has no quorum), then start them.

For each: the resets it caused (generations published), the training pause (the longest
gap between two steps of a worker around the event, against the median step gap), and
when the rendezvous answered again: the first write through a client that lists all
members, from the kill (6) or from the return of quorum (7).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "workers" / "recovery_worker.py"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from benchtable import median, table, write_json  # noqa: E402

GOAL_S = 3.0
#: What each repeat does, in order (the world goes 3 -> 2 -> 3 -> 2 -> 3 -> 2).
SCENARIOS = ("kill worker", "join", "kill leader", "join", "kill host")
STEADY_STEPS = 10  # steps every member completes in a generation before the next event
STOP_GRACE = 10.0  # seconds for a launcher to stop its workers after SIGTERM
POLL = 0.05


class Timeout(RuntimeError):
    """A bounded wait ran out."""


class Records:
    """Reads the workers' JSON-lines files incrementally."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rows: list[dict[str, Any]] = []
        self._offsets: dict[Path, int] = {}

    def refresh(self) -> list[dict[str, Any]]:
        for path in sorted(self.directory.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1  # only whole lines
            for line in data[:end].splitlines():
                if line.strip():
                    self.rows.append(json.loads(line))
            self._offsets[path] = offset + end
        return self.rows

    def steps(self, generation: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["event"] == "step"
                and (generation is None or r["generation"] == generation)]

    def newest_node_of(self, launcher_pid: int) -> str | None:
        """The node a launcher started last (node ids are HOSTNAME-LAUNCHERPID-INDEX)."""
        nodes = [r["node"] for r in self.rows
                 if r["node"].rsplit("-", 2)[-2:-1] == [str(launcher_pid)]]
        return nodes[-1] if nodes else None

    def latest_generation(self) -> dict[str, Any] | None:
        """The newest generation any worker has stepped in: id, size, members (node -> pid)."""
        steps = self.steps()
        if not steps:
            return None
        gen = max(r["generation"] for r in steps)
        members = {r["node"]: r["pid"] for r in steps if r["generation"] == gen}
        ranks = {r["node"]: r["rank"] for r in steps if r["generation"] == gen}
        size = next(r["size"] for r in steps if r["generation"] == gen)
        return {"id": gen, "size": size, "members": members, "ranks": ranks}


class Job:
    """One `horderun` job (and its `--join` launchers) on the benchmark's etcd."""

    def __init__(self, url: str, name: str, out: Path, env: dict[str, str]) -> None:
        self.url = url
        self.name = name
        self.out = out
        self.env = env
        self.launchers: list[subprocess.Popen] = []
        self.records = Records(out)

    def _launch(self, args: list[str]) -> tuple[subprocess.Popen, float]:
        log = open(self.out / f"launcher{len(self.launchers)}.log", "wb")  # noqa: SIM115
        cmd = [*_horderun(), "--rendezvous", self.url, "--job", self.name, *args,
               sys.executable, str(WORKER)]
        spawned = time.time()
        proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc._log = log  # type: ignore[attr-defined]
        self.launchers.append(proc)
        return proc, spawned

    def start(self) -> None:
        self._launch(["-np", "3", "--min-np", "2", "--max-np", "4"])

    def join(self) -> float:
        """Start one more worker; returns the wall time just before its launcher was spawned."""
        _, spawned = self._launch(["--join", "-np", "1"])
        return spawned

    def wait(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.records.refresh()
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise Timeout(f"timed out after {timeout:g} s waiting for {what}")
            if self.launchers and self.launchers[0].poll() is not None:
                raise RuntimeError(f"the job's horderun exited with code "
                                   f"{self.launchers[0].returncode} while waiting for {what}")
            time.sleep(POLL)

    def steady(self, size: int, timeout: float) -> dict[str, Any]:
        """Wait until a generation of `size` members has every member `STEADY_STEPS` in."""
        def ready() -> dict[str, Any] | None:
            gen = self.records.latest_generation()
            if gen is None or gen["size"] != size or len(gen["members"]) != size:
                return None
            counts: dict[str, int] = defaultdict(int)
            for r in self.records.steps(gen["id"]):
                counts[r["node"]] += 1
            return gen if all(counts[n] >= STEADY_STEPS for n in gen["members"]) else None
        return self.wait(ready, timeout, f"steady training with {size} workers")

    def output(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.out.glob("launcher*.log")))

    def worker_pids(self) -> set[int]:
        self.records.refresh()
        return {r["pid"] for r in self.records.rows}

    def stop(self) -> None:
        """Stop the launchers (they stop their workers), then any worker still alive."""
        for proc in self.launchers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.launchers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            proc._log.close()  # type: ignore[attr-defined]
        for pid in self.worker_pids():
            if _is_our_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _horderun() -> list[str]:
    exe = shutil.which("horderun", path=str(Path(sys.executable).parent)) or \
        shutil.which("horderun")
    return [exe] if exe else [sys.executable, "-m", "elastic.launcher.cli"]


def _is_our_worker(pid: int) -> bool:
    try:
        return str(WORKER) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _leader(backend: Any, job: str) -> str | None:
    from rendezvous.keys import JobKeys
    from rendezvous.settings import DEFAULT_PREFIX

    kv = backend.get(JobKeys(DEFAULT_PREFIX, job).leader)
    return kv.value.decode() if kv else None


# -- scenarios --------------------------------------------------------------------------

def kill(job: Job, gen: dict[str, Any], victim: str, timeout: float,
         launcher: subprocess.Popen | None = None) -> dict[str, Any]:
    """SIGKILL `victim` (and `launcher`, if given: the loss of a whole host).

    Returns the time until every survivor completed a step in a newer generation.
    """
    pid = gen["members"][victim]
    survivors = [n for n in gen["members"] if n != victim]
    killed_at = time.time()
    if launcher is not None:
        os.kill(launcher.pid, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)

    def recovered() -> dict[str, dict[str, Any]] | None:
        firsts: dict[str, dict[str, Any]] = {}
        for r in job.records.steps():
            if (r["node"] in survivors and r["generation"] > gen["id"]
                    and r["node"] not in firsts):
                firsts[r["node"]] = r
        return firsts if len(firsts) == len(survivors) else None

    firsts = job.wait(recovered, timeout, f"survivors to step after killing {victim}")
    new_gen = max(r["generation"] for r in firsts.values())
    rows = [r for r in job.records.rows if r["node"] in survivors
            and r.get("generation") == new_gen]
    created = next(r["generation_created"] for r in rows)
    phases = {
        "kill -> new generation published": created - killed_at,
        "-> process group rebuilt (last survivor)": _last(rows, "reset") - created,
        "-> state synchronized (last survivor)": _last(rows, "start") - _last(rows, "reset"),
        "-> first step (last survivor)": max(r["time"] for r in firsts.values())
        - _last(rows, "start"),
    }
    return {"seconds": max(r["time"] for r in firsts.values()) - killed_at,
            "victim": victim, "victim_rank": gen["ranks"][victim], "from_generation": gen["id"],
            "to_generation": new_gen, "generations_skipped": new_gen - gen["id"] - 1,
            "phases": phases}


def join(job: Job, gen: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Start one more worker; time until every member completed a step in the grown world."""
    job.records.refresh()
    known = {r["pid"] for r in job.records.rows}
    spawned = job.join()

    def grown() -> dict[str, Any] | None:
        newer = [r for r in job.records.steps() if r["generation"] > gen["id"]
                 and r["size"] == gen["size"] + 1]
        if not newer:
            return None
        new_gen = min(r["generation"] for r in newer)
        firsts: dict[str, dict[str, Any]] = {}
        for r in newer:
            if r["generation"] == new_gen and r["node"] not in firsts:
                firsts[r["node"]] = r
        return firsts if len(firsts) == gen["size"] + 1 else None

    firsts = job.wait(grown, timeout, "the grown world's first step")
    done = max(r["time"] for r in firsts.values())
    new_gen = next(iter(firsts.values()))["generation"]
    newcomer_rows = [r for r in job.records.rows if r["pid"] not in known]
    newcomer = {r["event"]: r["time"] for r in reversed(newcomer_rows)}  # first of each
    created = next(r["generation_created"] for r in firsts.values())
    imported = newcomer["imported"]
    member_rows = [r for r in job.records.rows if r.get("generation") == new_gen]
    phases = {
        "spawn -> worker script running": newcomer["boot"] - spawned,
        "-> start-up done (about to call hvd.init())": imported - newcomer["boot"],
        "-> new generation published": created - imported,
        "-> process group rebuilt (last member)": max(
            _last(member_rows, "reset"), newcomer["initialized"]) - created,
        "-> state synchronized (last member)": _last(member_rows, "start")
        - max(_last(member_rows, "reset"), newcomer["initialized"]),
        "-> first step (last member)": done - _last(member_rows, "start"),
    }
    last_old = max(r["time"] for r in job.records.steps(gen["id"]))
    return {"seconds": done - spawned, "startup_seconds": imported - spawned,
            "horde_seconds": done - imported, "pause_seconds": done - last_old,
            "from_generation": gen["id"],
            "to_generation": new_gen, "phases": phases}


def _last(rows: list[dict[str, Any]], event: str) -> float:
    times = [r["time"] for r in rows if r["event"] == event]
    return max(times) if times else float("nan")


def run_repeat(url: str, backend: Any, out: Path, env: dict[str, str], timeout: float,
               log: Any) -> list[dict[str, Any]]:
    name = f"recovery-{uuid.uuid4().hex[:8]}"
    job = Job(url, name, out, env)
    results: list[dict[str, Any]] = []
    try:
        job.start()
        gen = job.steady(3, timeout + 30)  # first start: three imports of torch
        for scenario in SCENARIOS:
            leader = job.wait(lambda: _leader(backend, name), timeout, "a leader")
            if scenario == "join":
                result = join(job, gen, timeout)
            elif scenario == "kill host":
                launcher = job.launchers[-1]  # the last --join, with its one worker
                victim = job.records.newest_node_of(launcher.pid)
                if victim not in gen["members"] or victim == leader:
                    raise RuntimeError(f"the last joined worker {victim} is not a plain member")
                result = kill(job, gen, victim, timeout, launcher)
                result["victim_rank"] = gen["ranks"][victim]
            else:
                if scenario == "kill leader":
                    victim = leader
                else:
                    others = sorted((n for n in gen["members"]
                                     if n != leader and gen["ranks"][n] != 0),
                                    key=lambda n: gen["ranks"][n])
                    victim = others[0]
                if victim not in gen["members"]:
                    raise RuntimeError(f"the leader {victim} is not in generation {gen['id']}")
                result = kill(job, gen, victim, timeout)
            result["scenario"] = scenario
            result["leader_before"] = leader
            results.append(result)
            log(f"  {scenario}: {result['seconds']:.2f} s")
            gen = job.steady(gen["size"] + (1 if scenario == "join" else -1), timeout)
    except (Timeout, RuntimeError) as exc:
        log(f"  {exc}\n{job.output()}")
        results.append({"scenario": "error", "error": str(exc)})
    finally:
        job.stop()
    return results


# -- etcd failures (--etcd-cluster) -----------------------------------------------------

QUORUM_LOSS_S = 10.0
CLUSTER_SCENARIOS = ("kill etcd member", "quorum loss")


def _rendezvous_back(url: str, since: float, timeout: float) -> float:
    """Seconds from `since` (wall time) to the first write the cluster accepts."""
    from rendezvous import RendezvousConnectionError, backend_from_url

    probe = backend_from_url(url, timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                probe.put("/bench/probe", b"1")
                return time.time() - since
            except RendezvousConnectionError:
                if time.monotonic() > deadline:
                    raise Timeout(f"etcd did not answer within {timeout:g} s") from None
                time.sleep(0.02)
    finally:
        probe.close()


def _pause(job: Job, start: float, end: float) -> tuple[float, float]:
    """The longest gap between two consecutive steps of one worker that overlaps
    [start, end], and the median gap of the whole run (the normal step)."""
    by_node: dict[str, list[float]] = defaultdict(list)
    for r in job.records.steps():
        by_node[r["node"]].append(r["time"])
    worst, gaps = 0.0, []
    for times in by_node.values():
        times.sort()
        for a, b in zip(times, times[1:]):
            gaps.append(b - a)
            if b >= start and a <= end:
                worst = max(worst, b - a)
    return worst, median(gaps) if gaps else float("nan")


def run_cluster_repeat(cluster: Any, out: Path, env: dict[str, str], timeout: float,
                       log: Any) -> list[dict[str, Any]]:
    name = f"recovery-{uuid.uuid4().hex[:8]}"
    job = Job(cluster.url, name, out, env)
    results: list[dict[str, Any]] = []
    try:
        job.start()
        gen = job.steady(3, timeout + 30)
        for scenario in CLUSTER_SCENARIOS:
            before = gen["id"]
            event = time.time()
            if scenario == "kill etcd member":
                cluster.kill(0)
                back = _rendezvous_back(cluster.url, event, timeout)
                end = event + back
            else:
                cluster.stop(1)
                cluster.stop(2)
                time.sleep(QUORUM_LOSS_S)
                returned = time.time()
                cluster.start(1, wait=False)
                cluster.start(2, wait=False)
                back = _rendezvous_back(cluster.url, returned, timeout)
                end = returned + back
            time.sleep(3.0)  # let the steps after the event land
            job.records.refresh()
            worst, normal = _pause(job, event, end)
            latest = job.records.latest_generation()
            resets = (latest["id"] - before) if latest else -1
            results.append({"scenario": scenario, "seconds": back, "pause_seconds": worst,
                            "step_gap_seconds": normal, "resets": resets})
            log(f"  {scenario}: rendezvous back after {back:.2f} s, longest step gap "
                f"{worst:.2f} s (normal {normal:.3f} s), {resets} reset(s)")
            if scenario == "kill etcd member":
                cluster.start(0)
            cluster.wait_healthy([0, 1, 2], timeout)
            gen = job.steady(gen["size"], timeout)
    except (Timeout, RuntimeError) as exc:
        log(f"  {exc}\n{job.output()}")
        results.append({"scenario": "error", "error": str(exc)})
    finally:
        job.stop()
    return results


def report_cluster(results: list[dict[str, Any]]) -> str:
    rows = []
    for scenario in CLUSTER_SCENARIOS:
        runs = [r for r in results if r.get("scenario") == scenario]
        if not runs:
            continue
        for label, key in (("rendezvous answers again after", "seconds"),
                           ("longest step gap around it", "pause_seconds"),
                           ("normal step gap", "step_gap_seconds"),
                           ("resets (generations published)", "resets")):
            values = [r[key] for r in runs]
            rows.append([f"{scenario}: {label}", len(runs), f"{min(values):.2f}",
                         f"{median(values):.2f}", f"{max(values):.2f}"])
    return table(["scenario", "n", "min", "median", "max"], rows)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scenario in ("kill worker", "kill leader", "kill host", "join"):
        runs = [r for r in results if r.get("scenario") == scenario]
        if not runs:
            continue
        metrics = {"total": [r["seconds"] for r in runs]}
        if scenario == "join":
            metrics["start-up"] = [r["startup_seconds"] for r in runs]
            metrics["horde"] = [r["horde_seconds"] for r in runs]
            metrics["pause"] = [r["pause_seconds"] for r in runs]
        phases: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            for k, v in r["phases"].items():
                phases[k].append(v)
        summary[scenario] = {
            "n": len(runs),
            **{k: {"min": min(v), "median": median(v), "max": max(v)} for k, v in metrics.items()},
            "within_goal": sum(1 for v in metrics["total"] if v <= GOAL_S),
            "victim_ranks": [r.get("victim_rank") for r in runs],
            "phases_median": {k: median(v) for k, v in phases.items()},
        }
    return summary


def report(summary: dict[str, Any], timeouts: int) -> str:
    labels = {
        ("kill worker", "total"): "kill worker (not rank 0, not leader) -> survivors step",
        ("kill leader", "total"): "kill leader -> survivors step",
        ("kill host", "total"): "kill host (launcher + worker) -> survivors step",
        ("join", "total"): "join: spawn -> first step with the newcomer",
        ("join", "start-up"): "  of which process start-up (spawn -> imports done)",
        ("join", "horde"): "  of which Horde (imports done -> first step)",
        ("join", "pause"): "  survivors' pause (last step before -> first step after)",
    }
    rows = []
    for (scenario, metric), label in labels.items():
        if scenario not in summary:
            continue
        s = summary[scenario]
        m = s[metric]
        goal = f"{s['within_goal']}/{s['n']}" if metric == "total" else ""
        rows.append([label, s["n"], f"{m['min']:.2f}", f"{m['median']:.2f}",
                     f"{m['max']:.2f}", goal])
    out = table(["scenario", "n", "min s", "median s", "max s", f"<= {GOAL_S:g} s"], rows)
    phase_rows = []
    for scenario in ("kill worker", "kill leader", "kill host", "join"):
        if scenario in summary:
            for k, v in summary[scenario]["phases_median"].items():
                phase_rows.append([scenario, k, f"{v:.3f}"])
    out += "\n\n" + table(["scenario", "phase (median)", "s"], phase_rows) + "\n"
    for scenario in ("kill worker", "kill leader", "kill host"):
        if scenario in summary:
            out += (f"\n{scenario}: killed ranks "
                    + ", ".join(str(r) for r in summary[scenario]["victim_ranks"]))
    if timeouts:
        out += f"\n\n{timeouts} repeat(s) failed or ran out of time (see the log above)"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="jobs to run (default 3)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--step-time", type=float, default=0.05,
                        help="seconds of simulated compute per training step (default 0.05)")
    parser.add_argument("--optimizer-after-init", action="store_true",
                        help="workers build their torch optimizer after hvd.init(), as most "
                        "Horovod scripts do (default: before, so start-up is all before init)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds any one wait may take (default 90)")
    parser.add_argument("--etcd-cluster", action="store_true",
                        help="run the etcd failures (member SIGKILL, 10 s quorum loss) on a "
                        "real three-member cluster instead of the worker scenarios")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the records and launcher logs (path printed)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from rendezvous import backend_from_url
    from rendezvous.embedded import EmbeddedEtcd

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def on_signal(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    tmp = Path(tempfile.mkdtemp(prefix="horde-recovery-"))
    etcd = None
    backend = None
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        if args.etcd_cluster:
            from rendezvous.local_cluster import LocalEtcdCluster

            etcd = LocalEtcdCluster(3)
        else:
            etcd = EmbeddedEtcd()
        backend = backend_from_url(etcd.url)
        for rep in range(args.repeats):
            out = tmp / f"repeat{rep}"
            out.mkdir()
            env = dict(os.environ)
            env.update({"HORDE_BENCH_OUT": str(out), "HORDE_BENCH_STEP_TIME": str(args.step_time),
                        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
                        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                        "HORDE_BENCH_OPTIMIZER_AFTER_INIT": "1" if args.optimizer_after_init
                        else ""})
            log(f"repeat {rep + 1}/{args.repeats} (records in {out})")
            runs = (run_cluster_repeat(etcd, out, env, args.timeout, log) if args.etcd_cluster
                    else run_repeat(etcd.url, backend, out, env, args.timeout, log))
            for r in runs:
                r["repeat"] = rep
                results.append(r)
    except KeyboardInterrupt:
        log("interrupted; stopping")
        return 130
    finally:
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.close()
        if etcd is not None:
            etcd.close() if args.etcd_cluster else etcd.stop()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    timeouts = sum(1 for r in results if r.get("scenario") == "error")
    if args.etcd_cluster:
        print(f"Horde recovery from etcd failures: -np 3 --min-np 2 --max-np 4 on a real "
              f"3-member etcd cluster, {args.step_time * 1e3:.0f} ms steps, quorum lost for "
              f"{QUORUM_LOSS_S:g} s; {os.cpu_count()} CPUs; {args.repeats} repeat(s); "
              f"{elapsed:.0f} s")
        print(report_cluster(results))
        if timeouts:
            print(f"\n{timeouts} repeat(s) failed or ran out of time (see the log above)")
        if args.json:
            write_json(args.json, {"benchmark": "recovery-etcd-cluster", "runs": results,
                                   "cpus": os.cpu_count(), "elapsed_s": elapsed})
        return 1 if timeouts else 0
    summary = summarise(results)
    print(f"Horde recovery with default settings: -np 3 --min-np 2 --max-np 4, "
          f"{args.step_time * 1e3:.0f} ms steps, commit every step, optimizer built "
          f"{'after' if args.optimizer_after_init else 'before'} hvd.init(); "
          f"{os.cpu_count()} CPUs; {args.repeats} repeat(s); {elapsed:.0f} s")
    print(report(summary, timeouts))
    if args.json:
        write_json(args.json, {"benchmark": "recovery", "cpus": os.cpu_count(),
                               "goal_s": GOAL_S, "step_time_s": args.step_time,
                               "optimizer_after_init": args.optimizer_after_init,
                               "repeats": args.repeats, "elapsed_s": elapsed,
                               "summary": summary, "runs": results})
    return 1 if timeouts else 0


if __name__ == "__main__":
    sys.exit(main())
