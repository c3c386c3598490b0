"""Shared parts of the communication benchmarks (wire_bytes, home_links, stragglers):
running one Horde job of `comm_worker.py`, on loopback or one worker per namespace of a
`NetLab`, and reading what its ranks wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "comm_worker.py"


class JobFailed(RuntimeError):
    """A benchmark job did not finish (a launcher failed or it ran out of time)."""


def horderun() -> list[str]:
    exe = (shutil.which("horderun")
           or shutil.which("horderun", path=str(Path(sys.executable).parent)))
    return [exe] if exe else [sys.executable, "-m", "elastic.launcher.cli"]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    return env


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def read_ranks(out: Path, size: int) -> list[dict[str, Any]]:
    ranks = []
    for r in range(size):
        path = out / f"rank{r}.json"
        if not path.exists():
            raise JobFailed(f"rank {r} wrote no results ({path})")
        ranks.append(json.loads(path.read_text()))
    return ranks


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float,
              what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i = failed[0]
            raise JobFailed(f"{what}: launcher {i} exited with code {codes[i]}; its log "
                            f"ends with:\n{_tail(logs[i])}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            raise JobFailed(f"{what}: not finished after {timeout:g} s; launcher 0's log "
                            f"ends with:\n{_tail(logs[0])}")
        time.sleep(0.2)


def run_loopback(workers: int, worker_args: list[str], out: Path, timeout: float,
                 what: str, coordinator: str = "none") -> list[dict[str, Any]]:
    """`horderun -np N` (embedded etcd) on this machine; returns the ranks' records.

    `coordinator` is horderun's `--coordinator` (the benchmarks measure the transport,
    so no credit reporting unless asked)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "horderun.log"
    cmd = [*horderun(), "-np", str(workers), "--log-level", "WARNING",
           "--coordinator", coordinator, sys.executable,
           str(WORKER), "--out", str(out), *worker_args]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_all([proc], [log], timeout, what)
        finally:
            stop_group(proc)
    return read_ranks(out, workers)


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM a launcher's process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def run_in_lab(lab: Any, etcd_url: str, worker_args: list[str], out: Path, timeout: float,
               what: str, coordinator: str = "none") -> list[dict[str, Any]]:
    """One `horderun -np 1` per namespace of `lab` (the first creates the job, the others
    `--join`), each advertising and binding its namespace's interface ("{iface}" in
    `worker_args` becomes that interface's name)."""
    from rendezvous import backend_from_url
    from rendezvous.keys import JobKeys
    from rendezvous.settings import RendezvousSettings

    out.mkdir(parents=True, exist_ok=True)
    job = f"bench-{uuid.uuid4().hex[:8]}"
    n = lab.workers
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    env = worker_env()
    try:
        for i in range(n):
            first = ["--min-np", str(n), "--max-np", str(n)] if i == 0 else ["--join"]
            cmd = [*horderun(), "-np", "1", *first, "--rendezvous", etcd_url, "--job", job,
                   "--network-interfaces", lab.iface(i), "--log-level", "WARNING",
                   "--coordinator", coordinator,
                   "--start-timeout", "60", sys.executable, str(WORKER), "--out", str(out),
                   *[a.replace("{iface}", lab.iface(i)) for a in worker_args]]
            logs.append(out / f"launcher{i}.log")
            procs.append(lab.popen(i, cmd, logs[-1], env=env, cwd=str(REPO)))
            if i == 0:  # the joiners need the job's config in etcd
                backend = backend_from_url(etcd_url)
                keys = JobKeys(RendezvousSettings().prefix, job)
                try:
                    deadline = time.monotonic() + 60
                    while backend.get(keys.config) is None:
                        if procs[0].poll() is not None or time.monotonic() > deadline:
                            raise JobFailed(f"{what}: the first launcher did not create job "
                                            f"{job}:\n{_tail(logs[0])}")
                        time.sleep(0.1)
                finally:
                    backend.close()
        _wait_all(procs, logs, timeout, what)
    finally:
        for proc in procs:
            stop_group(proc)
    return read_ranks(out, n)


def run_in_netlab(name: str, tag: str, workers: int, keep_logs: bool,
                  body: Callable[[Any, Any, Path], None]) -> int:
    """Build a `NetLab` of `workers` namespaces and an embedded etcd on its bridge, call
    `body(lab, etcd, logdir)`, and tear everything down.

    Returns 0; 2 (said on stderr) when the lab cannot be built (not root, tools missing);
    1 when a job failed (its logs are kept and named).
    """
    from netlab import LabUnavailable, NetLab, require_lab_tools

    try:
        require_lab_tools()
    except LabUnavailable as exc:
        sys.stderr.write(f"{name}: cannot run: {exc}\n")
        return 2
    from rendezvous.embedded import EmbeddedEtcd

    tmp = Path(tempfile.mkdtemp(prefix=f"horde-{name}-"))
    etcd = None
    done = False
    try:
        with NetLab(workers, tag) as lab:
            etcd = EmbeddedEtcd(host=lab.bridge_address)
            body(lab, etcd, tmp)
        done = True
    except LabUnavailable as exc:
        sys.stderr.write(f"{name}: cannot run: {exc}\n")
        return 2
    except JobFailed as exc:
        sys.stderr.write(f"{name}: {exc}\n(logs kept in {tmp})\n")
        return 1
    finally:
        if etcd is not None:
            etcd.stop()
        if done and not keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
