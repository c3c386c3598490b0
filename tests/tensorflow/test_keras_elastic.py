"""Elastic Keras end to end: real horderun and etcd; a worker is SIGKILLed, then one joins."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e "
                    "'.[tensorflow]')")

from tests.elastic.conftest import Job, check_identical_parameters, job  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = "../../tensorflow/scripts/keras_elastic_worker.py"
# Long enough for a newcomer to import TensorFlow and join while the survivor trains alone.
SLOW = {"TEST_STEP_DELAY": "0.15", "TEST_EPOCHS": "10"}


def _sizes_after(job: Job, t: float) -> set[int]:  # noqa: F811
    return {c["size"] for c in job.commits() if c["time"] > t}


def test_keras_fit_survives_a_sigkill_and_a_join(job: Job) -> None:  # noqa: F811
    job.horderun("-np", "2", "--min-np", "1", "--max-np", "2", script=SCRIPT, env=SLOW)
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 2 and len(job.commits()) >= 6,
             120, "two workers committing")
    before = job.pids_by_node()
    victim = job.latest_pid(rank=1)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    job.wait(lambda: 1 in _sizes_after(job, killed_at), 60, "the survivor committing alone")
    joined_at = time.time()
    job.horderun("-np", "1", script=SCRIPT, env=SLOW, join=True)
    survivor = next(n for n, pids in job.pids_by_node().items() if victim not in pids)
    restarts = [r for r in job.records() if r["event"] == "start" and r["time"] > killed_at]
    assert restarts, "the survivor never re-entered its training function"
    committed = {c["params"] for c in job.commits()
                 if c["generation"] < restarts[0]["generation"]}
    assert restarts[0]["params"] in committed, "the survivor did not roll back to a commit"
    job.wait(lambda: 2 in _sizes_after(job, joined_at), 120, "training to resume with 2")
    assert job.finish(180) == [0, 0], job.output()
    assert job.pids_by_node()[survivor] == before[survivor], "the survivor was restarted"
    assert check_identical_parameters(job.commits()) > 10
    newcomer = [c for c in job.commits() if c["time"] > joined_at and c["node"] not in before]
    assert newcomer, "the newcomer never committed"
    done = [r for r in job.records() if r["event"] == "done"]
    assert len(done) == 2 and {r["size"] for r in done} == {2}, done
    assert all(r["epoch"] == int(SLOW["TEST_EPOCHS"]) for r in done), done
    assert len({r["params"] for r in done}) == 1, "the ranks ended with different weights"
