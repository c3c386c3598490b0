"""Step time of dense synchronous data-parallel training: Horde versus PyTorch DDP.

    python benchmarks/overhead.py [--rounds 10] [--models small,large] [--json PATH]
                                  [--profile DIR]

Starts two 2-process jobs side by side and keeps them for the whole run:
- Horde: `horderun -np 2 python benchmarks/workers/overhead_worker.py` (embedded etcd,
  default settings), a Horovod-style loop with `hvd.DistributedOptimizer`;
- DDP: two `benchmarks/workers/ddp_worker.py` processes on a Gloo process group over
  `tcp://127.0.0.1:PORT`, the model wrapped in `DistributedDataParallel` (defaults).

Both train the same models (an MLP of 0.13 M and one of 6.3 M parameters) from the same
weights, on the same per-rank batches, with SGD and one thread per process. The
benchmark tells one job at a time to run (rounds alternate A B / B A, so drift of the
shared machine hits both alike); the other job's processes sit blocked on a socket.
Each run starts with warm-up steps that are not measured. A third row, "local", runs
DDP's processes under `no_sync()`: the same compute with no communication at all.

Reported per model and system: median, p90 and mean step time (rank 0's wall time of
zero_grad + forward + backward + optimizer.step), and Horde/DDP as the ratio of the
medians, with the range of the per-round ratios. Each run also checks that both ranks
end with the same weights and that Horde and DDP end with the same weights.
With --profile DIR, one extra Horde run per model is instrumented (see
benchmarks/workers/profile_horde.py) and its per-step breakdown is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKERS = HERE / "workers"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(WORKERS))
from benchtable import median, percentile, table, wait_for_quiet, write_json  # noqa: E402
from overhead_common import CONTROL_ENV, MODELS  # noqa: E402

GOAL = 1.05  # the goal: Horde within 5 % of DDP
LABELS = {"ddp": "DDP", "horde": "Horde", "local": "local (no comm)",
          "horde:cap1": "Horde, bucket_cap_mb=1 (experiment)",
          "horde:nonego": "Horde, no negotiation (experiment)",
          "horde:nocredit": "Horde, no credit report (experiment)"}
VARIANTS = ("cap1", "nonego", "nocredit")
DEFAULT_STEPS = {"small": 200, "large": 20}
DEFAULT_WARMUP = {"small": 20, "large": 3}
QUIET_CPUS = 0.5  # a run starts once fewer CPUs than this are busy (or --quiet-wait passed)
CONNECT_TIMEOUT = 180.0  # seconds for every worker to start and report in
RUN_TIMEOUT = 600.0  # seconds for one run of one system
QUIT_TIMEOUT = 30.0


class Worker:
    """One connected worker process, as seen from the benchmark."""

    def __init__(self, conn: socket.socket, hello: dict[str, Any]) -> None:
        self.conn = conn
        self.file = conn.makefile("rwb")
        self.system = hello["hello"]
        self.rank = int(hello["rank"])
        self.pid = int(hello["pid"])

    def send(self, message: dict[str, Any]) -> None:
        self.file.write((json.dumps(message) + "\n").encode())
        self.file.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        self.conn.settimeout(timeout)
        line = self.file.readline()
        if not line:
            raise RuntimeError(f"{self.system} rank {self.rank} (pid {self.pid}) hung up")
        return json.loads(line)


class Bench:
    """The two jobs, their control connections, and the processes to clean up."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.workers: dict[tuple[str, int], Worker] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="horde-overhead-"))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(1.0)
        self.control = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.horderun_pid: int | None = None

    # -- processes ---------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = self.tmp / f"{name}.log"
        handle = open(log, "wb")  # noqa: SIM115 - closed in cleanup
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc._log = handle  # type: ignore[attr-defined]
        self.procs.append(proc)
        self.logs.append(log)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[CONTROL_ENV] = self.control
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["OMP_NUM_THREADS"] = "1"
        return env

    def start(self) -> None:
        env = self._env()
        port = _free_port()
        for rank in range(2):
            self._spawn(f"ddp{rank}", [sys.executable, str(WORKERS / "ddp_worker.py")],
                        {**env, "RANK": str(rank), "WORLD_SIZE": "2",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        horderun = shutil.which("horderun", path=str(Path(sys.executable).parent)) or \
            shutil.which("horderun")
        launcher = [horderun] if horderun else [sys.executable, "-m", "elastic.launcher.cli"]
        self._spawn("horderun", [*launcher, "-np", "2", sys.executable,
                                 str(WORKERS / "overhead_worker.py")], env)
        self.horderun_pid = self.procs[-1].pid
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while len(self.workers) < 4:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.workers)} of 4 workers reported in within "
                                   f"{CONNECT_TIMEOUT:g} s\n{self.output()}")
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker exited early (code {dead[0].returncode})\n"
                                   f"{self.output()}")
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            conn.settimeout(CONNECT_TIMEOUT)
            hello = json.loads(conn.makefile("rb").readline())
            worker = Worker(conn, hello)
            self.workers[(worker.system, worker.rank)] = worker

    def output(self) -> str:
        return "\n".join(f"=== {p.name} ===\n{p.read_text(errors='replace')[-3000:]}"
                         for p in self.logs if p.exists())

    def cleanup(self) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(OSError, ValueError):
                worker.send({"cmd": "quit"})
        deadline = time.monotonic() + QUIT_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(8)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            proc._log.close()  # type: ignore[attr-defined]
        for worker in self.workers.values():
            with contextlib.suppress(OSError):
                worker.conn.close()
        self.server.close()
        if not self.args.keep_logs:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- runs --------------------------------------------------------------------------

    def run(self, system: str, model: str, warmup: int, steps: int,
            profile: str | None = None) -> dict[str, Any]:
        """One run on both ranks of `system`; rank 0's step times and both checksums."""
        job = "ddp" if system in ("ddp", "local") else "horde"
        order = {"cmd": "run", "model": model, "warmup": warmup, "steps": steps,
                 "mode": "local" if system == "local" else "sync",
                 "variant": system.split(":", 1)[1] if ":" in system else "default"}
        if profile:
            order["profile"] = profile
        ranks = [self.workers[(job, r)] for r in range(2)]
        launcher = self.horderun_pid if job == "horde" else None
        launcher_cpu = _cpu_seconds(launcher)
        for w in ranks:
            w.send(order)
        replies = [w.receive(RUN_TIMEOUT) for w in ranks]
        out = {"times": replies[0]["times"], "checksums": [r["checksum"] for r in replies],
               "cpu": sum(r["cpu"] for r in replies) / len(replies)}
        if launcher is not None:
            # horderun itself: since the coordinator commit it also serves the embedded
            # coordinator that the workers report every step to
            out["launcher_cpu"] = (_cpu_seconds(launcher) - launcher_cpu) / (warmup + steps)
        return out


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads); 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _close(a: float, b: float, tol: float = 1e-4) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _versus(times: dict[str, list[float]], round_medians: dict[str, list[float]],
            system: str) -> dict[str, Any]:
    per_round = [h / d for h, d in zip(round_medians[system], round_medians["ddp"])]
    return {"ratio_of_medians": median(times[system]) / median(times["ddp"]),
            "ratio_of_means": sum(times[system]) / sum(times["ddp"]),
            "median_per_round_ratio": median(per_round), "per_round_ratios": per_round}


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    compared = ["ddp", "horde"] + [f"horde:{v}" for v in args.variants]
    systems = compared + ([] if args.no_local else ["local"])
    results: dict[str, Any] = {}
    for model in args.models:
        steps = args.steps or DEFAULT_STEPS[model]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[model]
        times: dict[str, list[float]] = {s: [] for s in systems}
        cpu: dict[str, list[float]] = {s: [] for s in systems}
        launcher_cpu: dict[str, list[float]] = {s: [] for s in systems}
        round_medians: dict[str, list[float]] = {s: [] for s in systems}
        problems: list[str] = []
        busy: list[float] = []
        for r in range(args.rounds):
            order = (compared if r % 2 == 0 else compared[::-1]) + systems[len(compared):]
            finals: dict[str, float] = {}
            for system in order:
                # After a wait that ran out (a long job of someone else's), look only briefly
                # until the machine has been quiet again, rather than stall every run.
                quiet = not busy or busy[-1] < QUIET_CPUS
                busy.append(wait_for_quiet(args.quiet_wait if quiet else min(args.quiet_wait, 2.0),
                                           QUIET_CPUS))
                out = bench.run(system, model, warmup, steps)
                times[system].extend(out["times"])
                cpu[system].append(out["cpu"])
                if "launcher_cpu" in out:
                    launcher_cpu[system].append(out["launcher_cpu"])
                round_medians[system].append(median(out["times"]))
                sums = out["checksums"]
                if system != "local":  # local runs train each rank on its own
                    if not _close(sums[0], sums[1], 1e-9):
                        problems.append(f"round {r}: {system} ranks ended with different "
                                        f"weights ({sums[0]!r} vs {sums[1]!r})")
                    finals[system] = sums[0]
            for system in compared[1:]:
                if not _close(finals["ddp"], finals[system]):
                    problems.append(f"round {r}: {system} and DDP ended with different "
                                    f"weights ({finals[system]!r} vs {finals['ddp']!r})")
            sys.stderr.write(
                f"  {model} round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{s} {round_medians[s][-1] * 1e3:.2f} ms" for s in systems) + "\n")
            sys.stderr.flush()
        results[model] = {
            "params": MODELS[model].params, "batch": MODELS[model].batch,
            "steps_per_run": steps, "warmup_per_run": warmup, "rounds": args.rounds,
            "systems": {s: {"steps": len(times[s]), "median_ms": median(times[s]) * 1e3,
                            "p90_ms": percentile(times[s], 90) * 1e3,
                            "mean_ms": sum(times[s]) / len(times[s]) * 1e3,
                            "cpu_ms_per_step": median(cpu[s]) * 1e3,
                            "launcher_cpu_ms_per_step": median(launcher_cpu[s]) * 1e3
                            if launcher_cpu[s] else None,
                            "round_medians_ms": [m * 1e3 for m in round_medians[s]]}
                        for s in systems},
            "versus_ddp": {s: _versus(times, round_medians, s) for s in compared[1:]},
            "weights_match": not problems, "problems": problems,
            "busy_cpus_before_runs": busy,
            "quiet_runs": sum(1 for b in busy if b < QUIET_CPUS), "runs": len(busy),
        }
    return results


def report(results: dict[str, Any]) -> str:
    rows = []
    for model, res in results.items():
        for system, stats in res["systems"].items():
            label = LABELS.get(system, system)
            rows.append([model, f"{res['params'] / 1e6:.2f} M", label, stats["steps"],
                         f"{stats['median_ms']:.2f}", f"{stats['p90_ms']:.2f}",
                         f"{stats['mean_ms']:.2f}", f"{stats['cpu_ms_per_step']:.2f}",
                         "-" if stats["launcher_cpu_ms_per_step"] is None
                         else f"{stats['launcher_cpu_ms_per_step']:.2f}"])
    first = table(["model", "params", "system", "steps", "median ms", "p90 ms", "mean ms",
                   "CPU ms/step/proc", "horderun CPU ms/step"], rows)
    rows = []
    for model, res in results.items():
        ddp = res["systems"]["ddp"]["median_ms"]
        local = res["systems"].get("local", {}).get("median_ms")
        for system, versus in res["versus_ddp"].items():
            ratio = versus["ratio_of_medians"]
            per_round = versus["per_round_ratios"]
            extra = "n/a"
            if local is not None and ddp > local:
                extra = f"{(res['systems'][system]['median_ms'] - ddp) / (ddp - local):+.0%}"
            rows.append([model, LABELS.get(system, system), f"{ratio:.3f}",
                         f"{versus['median_per_round_ratio']:.3f}",
                         f"{min(per_round):.2f}-{max(per_round):.2f}",
                         f"{versus['ratio_of_means']:.3f}", extra,
                         "yes" if ratio <= GOAL else "NO",
                         "yes" if res["weights_match"] else "NO"])
    second = table(["model", "system", "/DDP median", "/DDP per-round median",
                    "per-round range", "/DDP mean", "extra vs DDP comm",
                    f"within {GOAL - 1:.0%}", "same weights"], rows)
    quiet = sum(r["quiet_runs"] for r in results.values())
    runs = sum(r["runs"] for r in results.values())
    note = (f"{quiet} of {runs} runs started with fewer than {QUIET_CPUS} CPUs busy "
            "(the others waited --quiet-wait and went ahead)")
    return first + "\n\n" + second + "\n" + note


def profile(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for model in args.models:
        path = out_dir / f"horde-{model}.json"
        wait_for_quiet(args.quiet_wait, QUIET_CPUS)
        steps = args.steps or DEFAULT_STEPS[model]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[model]
        bench.run("horde", model, warmup, steps, profile=str(path))
        found[model] = json.loads(path.read_text())
    return found


def profile_report(found: dict[str, Any]) -> str:
    keys: list[str] = []
    for data in found.values():
        keys.extend(k for k in data["median_ms"] if k not in keys)
    rows = [[k] + [found[m]["median_ms"].get(k, math.nan) for m in found] for k in keys]
    step = table(["Horde rank 0, one instrumented step (median ms)", *found], rows)
    keys = []
    for data in found.values():
        keys.extend(k for k in data["isolated_ms"] if k not in keys)
    rows = [[k] + [v for m in found for v in found[m]["isolated_ms"].get(k, [math.nan] * 2)]
            for k in keys]
    alone = table(["the same collectives alone (ms)",
                   *[f"{m} {w}" for m in found for w in ("median", "min")]], rows)
    return step + "\n\n" + alone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10,
                        help="A/B rounds per model (each system runs once per round)")
    parser.add_argument("--models", default="small,large",
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, help="measured steps per run (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--warmup", type=int, help="unmeasured steps at the start of each run")
    parser.add_argument("--no-local", action="store_true",
                        help="skip the no-communication baseline")
    parser.add_argument("--variants", default="",
                        help="also run Horde experiments, comma-separated: cap1 "
                        "(DistributedOptimizer(bucket_cap_mb=1)), nonego (the engine's "
                        "negotiation allgather skipped), nocredit (the per-step credit "
                        "report skipped); the last two patch the benchmark's workers only")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each run, wait up to this many seconds for the machine "
                        f"to have fewer than {QUIET_CPUS} CPUs busy (default 20; 0: never)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--profile", metavar="DIR", help="afterwards, profile one Horde run "
                        "per model and write the breakdown to DIR")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in args.variants):
        parser.error(f"unknown variant in {args.variants}; choose from {', '.join(VARIANTS)}")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.rounds < 1 and not args.profile:
        parser.error("--rounds must be at least 1 (or 0 with --profile: profile only)")

    bench = Bench(args)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        sys.stderr.write(f"starting DDP and Horde workers (logs in {bench.tmp})\n")
        bench.start()
        started = time.monotonic()
        results = measure(bench, args) if args.rounds else {}
        found = profile(bench, args) if args.profile else None
        elapsed = time.monotonic() - started
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; stopping the workers\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed run: show the workers' output
        sys.stderr.write(f"benchmark failed: {exc}\n{bench.output()}\n")
        return 1
    finally:
        bench.cleanup()
    import torch

    print(f"Horde vs DDP, dense synchronous SGD, 2 processes x 1 thread, Gloo on loopback; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds; "
          f"{elapsed:.0f} s")
    if results:
        print(report(results))
    if found:
        print()
        print(profile_report(found))
    if args.json:
        write_json(args.json, {"benchmark": "overhead", "cpus": os.cpu_count(),
                               "torch": torch.__version__, "rounds": args.rounds,
                               "elapsed_s": elapsed, "goal_ratio": GOAL, "models": results,
                               "profile": found})
    return 0


if __name__ == "__main__":
    sys.exit(main())
