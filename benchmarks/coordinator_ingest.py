"""Coordinator ingestion: sustained round reports against the real server, and the status
page's latency under that load.

    python benchmarks/coordinator_ingest.py [--rate 2000] [--batches 25,50,100]
        [--saturate 50] [--duration 10] [--connections 4] [--world 4] [--sync FULL]

Starts `horde-coordinator serve` (waitress, SQLite ledger in a temporary directory) as a
child process and registers `--world` nodes. Each run starts a load generator in another
process: `--connections` keep-alive HTTP connections, one per reporting node, posting
batches of reports about consecutive rounds (every node reports every round, so every
round reaches its quorum and is credited).

- Open-loop runs (one per `--batches` size) offer `--rate` reports/s in all, on a fixed
  schedule; a request's latency counts from its scheduled send time, so time spent
  waiting behind a slow answer is not hidden. This is the goal's measurement.
- A closed-loop run (`--saturate`, 0 to skip) posts back to back: the most the server
  takes, and what queueing then does to latency.

Meanwhile this process fetches the status page (`/`) and its JSON (`/api/v1/status`)
every 200 ms. Prints one table; the ledger's credit is checked against the reports.

Goal (issue 4): >= 2000 reports/s with p99 < 50 ms, and the status page within 200 ms,
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchtable import percentile, table, write_json  # noqa: E402

logger = logging.getLogger("coordinator_ingest")

WARMUP = 1.0  # seconds of load not measured
STATUS_INTERVAL = float(os.environ.get("BENCH_STATUS_INTERVAL", "0.2"))
START_TIMEOUT = 30.0
JOB = "bench"


# -- the server --------------------------------------------------------------------------


def start_server(workdir: Path, sync: str, threads: int) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "port"
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - kept open for the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "--log-level", "WARNING", "serve",
         "--db", f"sqlite:///{workdir / 'ledger.db'}", "--port", "0", "--port-file",
         str(port_file), "--threads", str(threads), "--sqlite-synchronous", sync,
         # no etcd here: the rounds' generation is the one the reporters agree on
         "--trust-reported-membership"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(workdir / 'server.log').read_text()[-2000:]}")
        if port_file.exists():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                with urllib.request.urlopen(url + "/api/v1/health", timeout=2):
                    return proc, url
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


# -- the load generator (its own process) ------------------------------------------------


def make_batch(node: str, members: list[str], first_round: int, count: int,
               generation: int) -> bytes:
    reports = []
    for rnd in range(first_round, first_round + count):
        reports.append({
            "job": JOB, "generation": generation, "round": rnd, "members": members,
            "contributions": [{"node_id": m, "samples": 32, "staleness": 0,
                               "param_version": rnd, "accepted": True} for m in members],
            "loss": 1.0 / (1 + rnd), "timestamp": time.time()})
    return json.dumps({"node_id": node, "reports": reports}, separators=(",", ":")).encode()


def _connection_loop(host: str, port: int, node: str, token: str, members: list[str],
                     batch: int, generation: int, start_at: float, stop_at: float,
                     interval: float, offset: float, out: list[Any]) -> None:
    """Post batches until `stop_at`: every `interval` seconds (open loop, latency counted
    from the scheduled send time, so queueing is not hidden), or back to back when
    `interval` is 0 (closed loop: the most the server takes)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    reports = 0
    errors = 0
    first_round = 0
    # Bodies are built ahead of the clock in chunks so the generator's own cost stays low.
    pending: list[bytes] = []
    due = start_at - WARMUP + offset
    while time.monotonic() < stop_at:
        if not pending:
            pending = [make_batch(node, members, first_round + i * batch, batch, generation)
                       for i in range(20)]
            first_round += 20 * batch
        body = pending.pop(0)
        if interval:
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            t0 = due
            due += interval
        else:
            t0 = time.monotonic()
        status, _data = request(conn, "POST", "/api/v1/reports", body, headers)
        t1 = time.monotonic()
        if status != 200:
            errors += 1
            continue
        if t0 >= start_at:
            latencies.append(t1 - t0)
            reports += batch
    conn.close()
    out.append((latencies, reports, errors, first_round))


def generator(url: str, tokens: dict[str, str], batch: int, connections: int,
              generation: int, duration: float, rate: float, result: Any) -> None:
    """Runs in a child process: `connections` threads, each posting as one node; `rate`
    reports/s in all (open loop), or as fast as answered when `rate` is 0."""
    host, port = url.split("//", 1)[1].split(":")
    members = sorted(tokens)
    start_at = time.monotonic() + WARMUP
    stop_at = start_at + duration
    interval = connections * batch / rate if rate else 0.0
    out: list[Any] = []
    threads = [threading.Thread(target=_connection_loop, args=(
        host, int(port), members[i % len(members)], tokens[members[i % len(members)]],
        members, batch, generation, start_at, stop_at, interval,
        interval * i / connections, out)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = [x for o in out for x in o[0]]
    result.put({"latencies": latencies, "reports": sum(o[1] for o in out),
                "errors": sum(o[2] for o in out), "elapsed": duration})


# -- the status poller (this process) -----------------------------------------------------


def poll_status(url: str, stop: threading.Event, out: dict[str, list[float]]) -> None:
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    while not stop.is_set():
        for path, key in (("/", "page"), (f"/api/v1/status?job={JOB}", "json")):
            t0 = time.monotonic()
            status, _ = request(conn, "GET", path)
            if status == 200:
                out[key].append(time.monotonic() - t0)
        stop.wait(STATUS_INTERVAL)
    conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(url: str, server_pid: int, tokens: dict[str, str], batch: int, connections: int,
            generation: int, duration: float, rate: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=generator, args=(url, tokens, batch, connections, generation,
                                               duration, rate, result))
    status: dict[str, list[float]] = {"page": [], "json": []}
    stop = threading.Event()
    proc.start()
    time.sleep(WARMUP)
    cpu0 = cpu_seconds(server_pid)
    poller = threading.Thread(target=poll_status, args=(url, stop, status))
    poller.start()
    data = result.get(timeout=duration + 120)
    cpu = cpu_seconds(server_pid) - cpu0
    stop.set()
    poller.join()
    proc.join(30)
    lat = data["latencies"]
    return {
        "load": f"{rate:.0f}/s offered" if rate else "saturation",
        "batch": batch, "connections": connections,
        "reports_per_s": data["reports"] / data["elapsed"],
        "requests": len(lat), "errors": data["errors"],
        "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
        "page_p50_ms": percentile(status["page"], 50) * 1000,
        "page_p99_ms": percentile(status["page"], 99) * 1000,
        "page_max_ms": max(status["page"], default=float("nan")) * 1000,
        "json_p99_ms": percentile(status["json"], 99) * 1000,
        "server_cpu_ms_per_1k": cpu / max(data["reports"], 1) * 1e6,
    }


def idle_status(url: str) -> float:
    out: dict[str, list[float]] = {"page": [], "json": []}
    stop = threading.Event()
    t = threading.Thread(target=poll_status, args=(url, stop, out))
    t.start()
    time.sleep(1.5)
    stop.set()
    t.join()
    return percentile(out["page"], 50) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="offered reports/s of the open-loop runs")
    parser.add_argument("--batches", default="25,50,100",
                        help="reports per request of the open-loop runs (comma-separated)")
    parser.add_argument("--saturate", type=int, default=50,
                        help="reports per request of the closed-loop run (0: none)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--world", type=int, default=4, help="members per round")
    parser.add_argument("--threads", type=int, default=4, help="waitress threads")
    parser.add_argument("--sync", default="FULL", choices=["NORMAL", "FULL"],
                        help="SQLite synchronous mode of the ledger")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    batches = [int(b) for b in args.batches.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="horde-coord-bench-"))
    proc = None
    try:
        proc, url = start_server(workdir, args.sync, args.threads)
        host, port = url.split("//", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        tokens = {}
        for i in range(args.world):
            node = f"bench-{i}"
            status, body = request(conn, "POST", "/api/v1/nodes",
                                   json.dumps({"node_id": node}).encode(),
                                   {"Content-Type": "application/json"})
            assert status == 201, body
            tokens[node] = json.loads(body)["token"]
        idle_ms = idle_status(url)
        rows = []
        runs = [(batch, args.rate) for batch in batches]
        if args.saturate:
            runs.append((args.saturate, 0.0))
        for generation, (batch, rate) in enumerate(runs, start=1):
            logger.info("run: %d report(s) per request, %d connections, %s, %.0f s", batch,
                        args.connections, f"{rate:.0f} reports/s" if rate else "saturation",
                        args.duration)
            rows.append(run_one(url, proc.pid, tokens, batch, args.connections, generation,
                                args.duration, rate))
        # Every node reported every round it generated; check the ledger is exact.
        status, body = request(conn, "GET", "/api/v1/credits/leaderboard?limit=100")
        credited = sum(e["credit"] for e in json.loads(body)["entries"])
        status, body = request(conn, "GET", f"/api/v1/jobs/{JOB}")
        job = json.loads(body)
        conn.close()
        print()
        print(f"coordinator ingestion: SQLite ({args.sync}), waitress {args.threads} threads, "
              f"{args.world} members per round, {os.cpu_count()} CPUs, "
              f"{args.duration:g} s per run; status page idle p50 {idle_ms:.1f} ms")
        print(table(
            ["load", "reports/request", "reports/s", "requests", "errors", "p50 ms", "p99 ms",
             "page p50 ms", "page p99 ms", "page max ms", "status JSON p99 ms",
             "server CPU ms/1k reports"],
            [[r["load"], r["batch"], f"{r['reports_per_s']:.0f}", r["requests"], r["errors"],
              f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['page_p50_ms']:.1f}",
              f"{r['page_p99_ms']:.1f}", f"{r['page_max_ms']:.1f}", f"{r['json_p99_ms']:.1f}",
              f"{r['server_cpu_ms_per_1k']:.0f}"]
             for r in rows]))
        wal = workdir / "ledger.db-wal"
        wal_mib = wal.stat().st_size / 2**20 if wal.exists() else 0.0
        db_mib = (workdir / "ledger.db").stat().st_size / 2**20
        print(f"\nledger: {job['reports']} reports stored, {job['rounds']} rounds, "
              f"{credited} credit granted ({job['samples_credited']} by the job's counter); "
              f"database {db_mib:.0f} MiB, WAL {wal_mib:.1f} MiB")
        if args.json:
            write_json(args.json, {"rows": rows, "idle_page_p50_ms": idle_ms,
                                   "credited": credited, "job": job})
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
