"""Workers' reports become credit: the ledger equals what the workers' own logs say,
even when the coordinator is killed with SIGKILL in the middle of training."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from rendezvous.embedded import free_port
from tests.harness import horderun, repo_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "credit_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def own_samples(out: Path) -> dict[str, int]:
    totals = {}
    for log in out.glob("*.log"):
        totals[log.stem] = sum(int(line.split()[2]) for line in log.read_text().splitlines())
    return totals


def ledger(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT node_id, SUM(credit) FROM credits GROUP BY node_id")
        return {node: int(total) for node, total in rows}


@pytest.mark.parametrize(("pass_samples", "reinit_every"), [("1", "0"), ("0", "0"), ("0", "7")],
                         ids=["step(samples=n)", "step()", "step() with shutdown/init"])
def test_default_horderun_credits_its_workers(tmp_path: Path, pass_samples: str,
                                              reinit_every: str) -> None:
    # with shutdown/init every 7 steps, credit must neither stop nor count a step twice
    out = tmp_path / "logs"
    out.mkdir()
    db = tmp_path / "ledger.sqlite"
    result = horderun("-np", "2", "--coordinator-db", f"sqlite:///{db}", sys.executable, SCRIPT,
                      env=repo_env(OUT=str(out), STEPS="20", STEP_DELAY="0.02",
                                   PASS_SAMPLES=pass_samples, REINIT_EVERY=reinit_every),
                      timeout=180)
    assert result.returncode == 0, result.stderr
    assert "status page http://127.0.0.1:" in result.stderr
    assert ledger(db) == own_samples(out)


def test_plain_horderun_keeps_one_ledger_across_runs(tmp_path: Path) -> None:
    # Credits last: two runs without --coordinator-db land in one ledger in the data
    # folder, with one admin token, and leave nothing in the temporary directory.
    data, tmp = tmp_path / "data", tmp_path / "tmp"
    tmp.mkdir()
    expected: dict[str, int] = {}
    for run in range(2):
        out = tmp_path / f"logs{run}"
        out.mkdir()
        result = horderun("-np", "2", "--node-id-prefix", f"run{run}-", sys.executable, SCRIPT,
                          env=repo_env(OUT=str(out), STEPS="10", STEP_DELAY="0.02",
                                       PASS_SAMPLES="1", REINIT_EVERY="0",
                                       HORDE_DATA_DIR=str(data), TMPDIR=str(tmp)),
                          timeout=180)
        assert result.returncode == 0, result.stderr
        assert f"ledger sqlite:///{data / 'ledger.sqlite'}" in result.stderr
        expected.update(own_samples(out))
        if run == 0:
            token = (data / "admin-token").read_text()
    assert len(expected) == 4, expected  # two nodes per run, none shared
    assert ledger(data / "ledger.sqlite") == expected
    assert (data / "admin-token").read_text() == token
    assert oct((data / "admin-token").stat().st_mode & 0o777) == "0o600"
    # (torch's own compile cache may appear there; Horde's folders must not)
    assert [p.name for p in tmp.iterdir() if p.name.startswith("horde")] == []


def test_a_second_concurrent_horderun_keeps_its_own_ledger(tmp_path: Path) -> None:
    # one coordinator per SQLite file: while another run holds the data folder's ledger
    # (the lock is held here), this run's credits go to a ledger of its own beside it
    import fcntl

    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "logs"
    out.mkdir()
    with open(data / "ledger.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = horderun("-np", "2", sys.executable, SCRIPT,
                          env=repo_env(OUT=str(out), STEPS="5", STEP_DELAY="0.01",
                                       PASS_SAMPLES="1", REINIT_EVERY="0",
                                       HORDE_DATA_DIR=str(data)),
                          timeout=180)
    assert result.returncode == 0, result.stderr
    assert "another horderun is using the ledger" in result.stderr
    assert not (data / "ledger.sqlite").exists()
    [own] = data.glob("ledger-*.sqlite")
    assert ledger(own) == own_samples(out)


def test_unwritable_data_dir_trains_without_the_status_page(tmp_path: Path) -> None:
    # the data folder is a file: the coordinator cannot start; training still finishes
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    out = tmp_path / "logs"
    out.mkdir()
    result = horderun("-np", "1", sys.executable, SCRIPT,
                      env=repo_env(OUT=str(out), STEPS="3", STEP_DELAY="0.01", PASS_SAMPLES="1",
                                   REINIT_EVERY="0", HORDE_DATA_DIR=str(blocker)),
                      timeout=180)
    assert result.returncode == 0, result.stderr
    assert "the embedded coordinator did not start" in result.stderr
    assert "HORDE_DATA_DIR" in result.stderr


def test_ledger_survives_kill_9_of_the_coordinator(etcd_server: object, tmp_path: Path) -> None:
    out = tmp_path / "logs"
    out.mkdir()
    db = tmp_path / "ledger.sqlite"
    port = free_port()
    job = f"credit-{uuid.uuid4().hex[:6]}"
    serve = [sys.executable, "-m", "coordinator.cli", "serve", "--db", f"sqlite:///{db}",
             "--port", str(port), "--rendezvous", etcd_server.url, "--job", job]  # type: ignore[attr-defined]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(serve, env=repo_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).ok:
                    return proc
            except requests.RequestException:
                time.sleep(0.1)
        proc.kill()
        raise AssertionError("coordinator did not start")

    coordinator = start()
    training = subprocess.Popen(
        [sys.executable, "-m", "elastic.launcher.cli", "-np", "3", "--rendezvous",
         etcd_server.url, "--job", job, "--coordinator", f"http://127.0.0.1:{port}",  # type: ignore[attr-defined]
         "--log-level", "WARNING", sys.executable, SCRIPT],
        env=repo_env(OUT=str(out), STEPS="80", STEP_DELAY="0.05"), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sum(own_samples(out).values()) < 3 * 5 * 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(10)
        time.sleep(2)
        coordinator = start()
        _, err = training.communicate(timeout=150)
        assert training.returncode == 0, err
        expected = own_samples(out)
        assert len(expected) == 3 and all(expected.values())
        deadline = time.monotonic() + 20
        while ledger(db) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ledger(db) == expected
    finally:
        for proc in (training, coordinator):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
