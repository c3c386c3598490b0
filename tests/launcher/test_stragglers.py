"""Workers that run on after another finished: horderun says who and what they wait on,
and --exit-wait bounds the wait; a rank 0 that legitimately works longer is left alone."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from elastic.core.stall import Activity, read_activity
from elastic.launcher.launch import describe_stragglers
from rendezvous import backend_from_url
from rendezvous.generation import Generation, Member
from rendezvous.keys import JobKeys
from tests.harness import horderun, repo_env

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "exit_early.py")
pytestmark = pytest.mark.timeout(150)


def test_a_rank_that_works_on_is_reported_and_then_finishes_normally() -> None:
    result = horderun("-np", "2", "--coordinator", "none", "--exit-report-interval", "1",
                      sys.executable, SCRIPT, env=repo_env(RANK0_SECONDS="12"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[0]<stdout>:rank 0 done" in result.stdout
    report = re.search(r"horderun: worker 1 finished \d+ s ago; still running: worker 0 "
                       r"\(rank 0, node [^)]+\): not in a collective \(to bound this wait: "
                       r"--exit-wait SECONDS\)", result.stderr)
    assert report, result.stderr
    assert "stopping" not in result.stderr


def test_exit_wait_stops_the_workers_still_running_with_a_clear_message() -> None:
    started = time.monotonic()
    result = horderun("-np", "2", "--coordinator", "none", "--exit-wait", "2",
                      sys.executable, SCRIPT, env=repo_env(RANK0_SECONDS="300"), timeout=120)
    assert result.returncode == 1, result.stderr
    assert re.search(r"horderun: worker 1 finished \d+ s ago and --exit-wait is 2 s; stopping "
                     r"the workers still running: worker 0 \(rank 0, node [^)]+\): not in a "
                     r"collective", result.stderr), result.stderr
    assert "rank 0 done" not in result.stdout
    assert time.monotonic() - started < 100


@pytest.mark.parametrize(("flags", "message"), [
    (["--exit-wait", "0"], "--exit-wait 0 must be a positive number of seconds"),
    (["--exit-report-interval", "-1"], "--exit-report-interval -1 must be >= 0 seconds"),
])
def test_bad_exit_flags_are_refused(flags: list[str], message: str) -> None:
    result = horderun("-np", "2", *flags, sys.executable, SCRIPT, env=repo_env(), timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_the_report_names_the_collective_a_worker_waits_in(etcd_server: object) -> None:
    """Records as workers publish them, through a real etcd, into horderun's report."""
    backend = backend_from_url(etcd_server.url)  # type: ignore[attr-defined]
    keys = JobKeys("horde", f"report-{time.time_ns()}")
    try:
        now = time.time()
        backend.put(keys.activity_node("a-0"),
                    Activity("a-0", 0, 4, "allreduce 'loss' (shape [1], torch.float32)",
                             now - 42).to_json())
        backend.put(keys.activity_node("a-2"),
                    Activity("a-2", 1, 3, "barrier (unnamed)", now - 99).to_json())
        gen = Generation(id=4, members=(Member("a-0", "h", "127.0.0.1"),
                                        Member("a-1", "h", "127.0.0.1"),
                                        Member("a-2", "h", "127.0.0.1")),
                         store_host="127.0.0.1", store_port=1, reason="test")
        text = describe_stragglers([(0, "a-0"), (1, "a-1"), (2, "a-2")], gen,
                                   read_activity(backend, keys.activity), now)
    finally:
        backend.delete_prefix(keys.root)
        backend.close()
    assert text == ("worker 0 (rank 0, node a-0): waiting in allreduce 'loss' (shape [1], "
                    "torch.float32) for 42 s; worker 1 (rank 1, node a-1): not in a "
                    "collective; worker 2 (rank 2, node a-2): not in a collective")
