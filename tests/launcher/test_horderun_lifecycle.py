"""horderun refuses what cannot work, stops starting workers when the job is over, and
leaves nothing behind (no etcd, no data directory) when it is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from elastic.launcher.cli import main
from tests.harness import REPO, horderun, repo_env

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ENV_AND_EXIT = str(SCRIPTS / "env_and_exit.py")
COUNT_STARTS = str(SCRIPTS / "count_starts.py")
pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize(("args", "message"), [
    (["-np", "3", "--max-np", "2"], "-np 3 is above --max-np 2"),
    (["-np", "2", "--min-np", "3", "--max-np", "2"], "--min-np 3 is above --max-np 2"),
    (["-np", "1", "--min-np", "2"], "-np 1 is below --min-np 2"),
    (["-np", "0"], "-np 0 must be at least 1"),
    (["-np", "-2"], "-np -2 must be at least 1"),
    (["-np", "1", "--min-np", "0"], "--min-np 0 must be at least 1"),
    (["-np", "1", "--max-np", "0"], "--max-np 0 must be at least 1"),
    (["-np", "1", "--slots-per-host", "0"], "--slots-per-host 0 must be at least 1"),
])
def test_impossible_counts_are_refused_at_parse_time(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The training script need not exist: the counts are refused before it is looked at.
    with pytest.raises(SystemExit) as info:
        main([*args, sys.executable, "no_such_script.py"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: horderun") and f"horderun: error: {message}" in err


@pytest.mark.parametrize("others", [["-H", "localhost:1,far-away:1"],
                                    ["--rendezvous", "etcd://etcd.example:2379"]])
def test_fewer_workers_than_min_np_are_fine_when_others_can_join(
        others: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["-np", "1", "--min-np", "2", *others, sys.executable, "no_such_script.py"])
    assert code == 2 and "does not exist" in capsys.readouterr().err  # past the counts


@pytest.mark.parametrize("url", ["redis://x:6379", "zk://h:1"])
def test_unknown_rendezvous_scheme_is_a_one_line_error(url: str) -> None:
    result = horderun("-np", "1", "--rendezvous", url, sys.executable, ENV_AND_EXIT,
                      env=repo_env(), timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"horderun: error: --rendezvous {url!r} has the unknown scheme "
        f"{url.split(':')[0]!r}; Horde's rendezvous is etcd: give etcd://HOST:PORT"]


def test_no_worker_starts_after_the_job_finished(tmp_path: Path) -> None:
    """Rank 0 finishes at once, rank 1 a few discovery rounds later; the discovery script
    keeps offering two slots, and no third worker may start."""
    starts = tmp_path / "starts"
    starts.mkdir()
    discover = tmp_path / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:2\n")
    discover.chmod(0o755)
    result = horderun(
        "-np", "2", "--host-discovery-script", str(discover), "--coordinator", "none",
        "--log-level", "WARNING", sys.executable, COUNT_STARTS,
        env=repo_env(STARTS_DIR=str(starts), SLEEP_RANK_1="4", HORDE_DISCOVERY_INTERVAL="0.3"),
        timeout=120)
    started = sorted(p.read_text() for p in starts.glob("*.start"))
    assert result.returncode == 0, result.stderr
    assert len(started) == 2, (started, result.stderr)


def _etcd_under(launcher: psutil.Process) -> tuple[psutil.Process, Path]:
    """The etcd that this launcher started (not any other test's), and its data folder."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in launcher.children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if cmdline and os.path.basename(cmdline[0]) == "etcd":
                data = next(a.split("=", 1)[1] for a in cmdline if a.startswith("--data-dir="))
                return child, Path(data).parent
        time.sleep(0.1)
    raise AssertionError("horderun started no etcd")


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigkill_of_horderun_leaves_no_etcd_and_no_data_dir(tmp_path: Path) -> None:
    env = repo_env(SLEEP="120", PID_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "elastic.launcher.cli", "-np", "1",
                             "--coordinator", "none", sys.executable, ENV_AND_EXIT],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    leftovers: list[psutil.Process] = []
    try:
        etcd, data_dir = _etcd_under(psutil.Process(proc.pid))
        guard = etcd.parent()
        leftovers += [etcd, guard]
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("*.pid")) and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = psutil.Process(int(next(tmp_path.glob("*.pid")).stem))
        assert data_dir.is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                _gone(etcd) and _gone(guard) and _gone(worker) and not data_dir.exists()):
            time.sleep(0.1)
        assert _gone(etcd), "etcd outlived horderun"
        assert _gone(guard) and _gone(worker)
        assert not data_dir.exists(), f"{data_dir} was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in leftovers:  # only if the test failed: never leave etcd running
            if not _gone(leftover):
                leftover.kill()
