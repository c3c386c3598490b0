"""The owner's `horderun` serves the job (embedded etcd, coordinator, relay) to workers
that joined it: when its own worker dies, it keeps serving them until they finish, and
exits 0 when they finished the job, 1 when they left without finishing it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO, repo_env
from tests.lab.test_public_join import SCRIPT, _join_line, _records, _wait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:  # each in a session of its own: its workers go with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _start(procs: list[subprocess.Popen], argv: list[str], env: dict[str, str],
           log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - closed with the process's output
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    procs.append(proc)
    return proc


def _commits(folder: Path, size: int) -> list[dict]:
    return [r for r in _records(folder) if r["event"] == "commit" and r["size"] == size]


@pytest.mark.parametrize("joined_worker", ["finishes", "is killed"])
def test_owner_serves_joined_workers_after_its_own_worker_dies(
        procs: list[subprocess.Popen], tmp_path: Path, joined_worker: str) -> None:
    outs = {name: tmp_path / name for name in ("owner", "joiner")}
    for folder in outs.values():
        folder.mkdir()
    stop = tmp_path / "stop"
    logs = {name: tmp_path / f"{name}.log" for name in outs}
    common = {"TEST_EPOCHS": "1000", "TEST_STOP_FILE": str(stop), "TEST_STEP_DELAY": "0.05",
              "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    owner = _start(procs, [
        sys.executable, "-m", "elastic.launcher.cli", "-np", "1", "--min-np", "1",
        # the embedded coordinator issues the joiner's etcd user (auth is on by default)
        "--max-np", "2", "--data-dir", str(tmp_path / "data"), "--lease-ttl", "2",
        "--settle-window",
        "0.3", sys.executable, SCRIPT],
        repo_env(HORDE_TEST_OUT=str(outs["owner"]), HORDE_HOSTNAME="owner", **common),
        logs["owner"])
    all_logs = list(logs.values())
    argv = shlex.split(str(_wait("the join command", lambda: _join_line(logs["owner"]), 60,
                                 all_logs)))
    joiner = _start(procs, argv, repo_env(HORDE_TEST_OUT=str(outs["joiner"]),
                                          HORDE_HOSTNAME="joiner", **common), logs["joiner"])
    _wait("both workers committing as two", lambda: all(
        len(_commits(outs[n], 2)) >= 3 for n in outs), 90, all_logs)

    os.kill(_commits(outs["owner"], 2)[-1]["pid"], signal.SIGKILL)
    _wait("the joined worker committing alone", lambda: len(_commits(outs["joiner"], 1)) >= 3,
          60, all_logs)
    assert owner.poll() is None, logs["owner"].read_text(errors="replace")
    if joined_worker == "finishes":
        stop.touch()
    else:
        os.kill(_commits(outs["joiner"], 1)[-1]["pid"], signal.SIGKILL)
    for proc in (joiner, owner):
        _wait("horderun to exit", lambda proc=proc: proc.poll() is not None, 60, all_logs)
    owner_text = logs["owner"].read_text(errors="replace")
    assert "the job goes on with the workers that joined it" in owner_text
    # The joiner's etcd user may not lead: the owner's launcher leads it (etcd auth is on).
    assert "this launcher leads the joined workers' membership" in owner_text
    if joined_worker == "finishes":
        assert (owner.returncode, joiner.returncode) == (0, 0), owner_text
        assert [r["event"] for r in _records(outs["joiner"])][-1] == "done"
    else:
        assert owner.returncode == 1, owner_text
        assert "the joined workers left before the job finished" in owner_text
