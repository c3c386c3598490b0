"""horderun as a user runs it: flags, environment, output, exit codes and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rendezvous.embedded import free_port
from tests.harness import horderun as run_horderun
from tests.harness import repo_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "env_and_exit.py")
pytestmark = pytest.mark.timeout(120)


def horderun(*args: str, env: dict[str, str] | None = None, timeout: float = 90
             ) -> subprocess.CompletedProcess:
    return run_horderun(*args, env=repo_env(**(env or {})), timeout=timeout)


def test_two_workers_get_horovod_environment_and_prefixed_output() -> None:
    result = horderun("-np", "2", sys.executable, SCRIPT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[0]<stdout>:api rank=0 size=2" in out
    assert "[1]<stdout>:api rank=1 size=2" in out
    assert "[0]<stdout>:env HOROVOD_RANK=0 HOROVOD_SIZE=2 HOROVOD_LOCAL_RANK=0" in out
    assert "[1]<stdout>:env HOROVOD_RANK=1 HOROVOD_SIZE=2 HOROVOD_LOCAL_RANK=1" in out
    assert out.count("sum=2") == 2
    assert "embedded etcd" in result.stderr


def test_exit_code_of_a_failed_worker_is_the_jobs(tmp_path: Path) -> None:
    result = horderun("-np", "2", "--output-filename", str(tmp_path), sys.executable, SCRIPT,
                      env={"EXIT_RANK_1": "3"})
    assert result.returncode == 3, result.stderr
    assert "worker 1" in result.stderr and "code 3" in result.stderr
    assert "api rank=0" in (tmp_path / "rank.0" / "stdout").read_text()
    assert "api rank=1" in (tmp_path / "rank.1" / "stdout").read_text()


def test_mismatched_tensors_fail_promptly_with_a_clear_message() -> None:
    started = time.monotonic()
    result = horderun("-np", "2", sys.executable, SCRIPT, env={"MISMATCH": "1"})
    assert result.returncode != 0
    assert "Mismatched allreduce tensor shapes" in result.stderr
    assert time.monotonic() - started < 60


def test_unknown_flag_is_rejected() -> None:
    result = horderun("--no-such-flag", "-np", "2", sys.executable, SCRIPT)
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["-np", "2", sys.executable, "no_such_script.py"], "does not exist"),
    (["-np", "2", "no-such-program-xyz"], "was not found on PATH"),
    (["-np", "0", sys.executable, SCRIPT], "must be at least 1"),
    (["-np", "2", "--min-np", "3", "--max-np", "2", sys.executable, SCRIPT],
     "--min-np 3 is above --max-np 2"),
    (["--join", "-np", "1", sys.executable, SCRIPT], "--join needs --rendezvous"),
    (["-np", "2", "--rendezvous", "localhost:2379", sys.executable, SCRIPT],
     "etcd://HOST:PORT"),
    (["-np", "2", "--mpi", sys.executable, SCRIPT], "--mpi is not supported"),
    (["-np", "2"], "no training command"),
])
def test_bad_input_gets_a_clear_message(args: list[str], message: str) -> None:
    result = horderun(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_unreachable_etcd_is_reported_with_its_address() -> None:
    port = free_port()
    result = horderun("-np", "2", "--rendezvous", f"etcd://127.0.0.1:{port}", sys.executable,
                      SCRIPT, timeout=60)
    assert result.returncode == 1
    assert f"cannot reach etcd at 127.0.0.1:{port}" in result.stderr


def test_join_of_a_job_that_does_not_exist(etcd_server: object) -> None:
    result = horderun("--join", "--rendezvous", etcd_server.url, "--job", "nope-xyz", "-np",  # type: ignore[attr-defined]
                      "1", sys.executable, SCRIPT)
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_ctrl_c_stops_every_worker(tmp_path: Path) -> None:
    env = repo_env(SLEEP="120", PID_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "elastic.launcher.cli", "-np", "2",
                             sys.executable, SCRIPT], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        assert code == 128 + signal.SIGINT
        time.sleep(0.5)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_check_build_lists_gloo() -> None:
    result = horderun("--check-build")
    assert result.returncode == 0
    assert "[X] Gloo" in result.stdout and "[X] PyTorch" in result.stdout


def test_help_mentions_join() -> None:
    result = horderun("--help")
    assert result.returncode == 0
    assert "--join" in result.stdout and "--rendezvous" in result.stdout


def test_hosts_flag_starts_this_machines_slots_and_tells_how_others_join() -> None:
    result = horderun("-H", "localhost:2,far-away-box:4", "--network-interfaces", "lo",
                      sys.executable, SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "api rank=1 size=2" in result.stdout
    assert "far-away-box" in result.stderr and "--join" in result.stderr


def test_unknown_network_interface_is_rejected() -> None:
    result = horderun("-np", "1", "--network-interfaces", "nosuchif0", sys.executable, SCRIPT)
    assert result.returncode == 2
    assert "nosuchif0" in result.stderr


def test_data_folder_comes_from_the_flag_then_horde_data_dir_then_the_user_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    from elastic.launcher.cli import build_plan, make_parser

    def plan(*flags: str) -> object:
        return build_plan(make_parser().parse_args([*flags, "-np", "1", "true"]))

    monkeypatch.setenv("HORDE_DATA_DIR", str(tmp_path / "env"))
    assert plan("--data-dir", str(tmp_path / "flag")).data_dir == str(tmp_path / "flag")
    assert plan().data_dir == str(tmp_path / "env")
    monkeypatch.delenv("HORDE_DATA_DIR")
    assert plan().data_dir == platformdirs.user_data_dir("horde", appauthor=False)


def test_trust_marks_of_the_owners_workers_are_removed_from_an_etcd_of_its_own(
        etcd_server: object) -> None:
    """On an etcd that outlives the job, the owner's workers' `trusted/` marks (written at
    start, see tests/security/test_etcd_auth.py) are gone after the job."""
    from rendezvous import backend_from_url
    from rendezvous.keys import JobKeys
    from rendezvous.settings import DEFAULT_PREFIX
    from tests.harness import unique_job

    job = unique_job("marks")
    url = etcd_server.url  # type: ignore[attr-defined]
    result = horderun("-np", "2", "--rendezvous", url, "--job", job, "--coordinator", "none",
                      sys.executable, SCRIPT)
    assert result.returncode == 0, result.stderr
    backend = backend_from_url(url)
    keys = JobKeys(DEFAULT_PREFIX, job)
    assert backend.get_prefix(keys.nodes)[0] == []  # the job ran and left
    assert backend.get_prefix(keys.trusted)[0] == []
    backend.close()
