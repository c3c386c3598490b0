"""A job on a real three-member etcd cluster survives its etcd member's death and a loss
of quorum: real horderun, real worker processes, real etcd members killed and restarted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rendezvous.local_cluster import LocalEtcdCluster
from tests.elastic.conftest import Job, check_identical_parameters

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: Trains until the test creates the stop file (then to the end of that epoch).
TRAIN = {"TEST_STEP_DELAY": "0.08", "TEST_EPOCHS": "1000", "TEST_COMMIT_EVERY": "2"}


@pytest.fixture
def cluster_job(etcd_cluster: LocalEtcdCluster, tmp_path: Path) -> Iterator[Job]:
    out = tmp_path / "records"
    out.mkdir()
    job = Job(etcd_cluster.url, out, f"test-{uuid.uuid4().hex[:8]}")
    try:
        yield job
    finally:
        job.cleanup()


def _commits_after(job: Job, t: float) -> int:
    return len([c for c in job.commits() if c["time"] > t])


def test_job_survives_member_sigkill_and_quorum_loss(
        cluster_job: Job, etcd_cluster: LocalEtcdCluster) -> None:
    job = cluster_job
    stop_file = job.out / "stop"
    job.horderun("-np", "3", "--min-np", "2", "--max-np", "3", "--coordinator", "none",
                 "--elastic-timeout", "60", env={**TRAIN, "TEST_STOP_FILE": str(stop_file)})
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 3 and len(job.commits()) >= 9,
             90, "three workers committing")
    assert "etcd cluster of 3 members" in job.output()

    # 1. SIGKILL the member every worker and the launcher talk to (the first listed).
    killed_at = time.time()
    etcd_cluster.kill(0)
    job.wait(lambda: _commits_after(job, killed_at) >= 12, 60, "commits after the kill")
    time.sleep(3.0)  # the agents' keepalives and watches move to another member meanwhile
    etcd_cluster.start(0)
    etcd_cluster.wait_healthy([0, 1, 2])
    restarted_at = time.time()
    job.wait(lambda: _commits_after(job, restarted_at) >= 9, 60, "commits after the restart")

    # 2. Stop two members for 10 s: the cluster has no quorum, then gets it back.
    etcd_cluster.stop(1)
    etcd_cluster.stop(2)
    lost_at = time.time()
    time.sleep(10.0)
    during = _commits_after(job, lost_at)
    etcd_cluster.start(1)
    etcd_cluster.start(2)
    etcd_cluster.wait_healthy([0, 1, 2])
    back_at = time.time()
    job.wait(lambda: _commits_after(job, back_at) >= 9, 60, "commits after quorum returned")

    stop_file.touch()
    codes = job.finish(timeout=90)
    output = job.output()
    assert codes == [0], output
    # Neither outage cost a reset: one generation, no worker restarted its function.
    assert {c["generation"] for c in job.commits()} == {0}, output
    assert [r["event"] for r in job.records()].count("start") == 3, output
    # No commit lost: each member's commits go forward, never back to an earlier one.
    for node in {c["node"] for c in job.commits()}:
        points = [(c["epoch"], c["batch"]) for c in job.commits() if c["node"] == node]
        assert points == sorted(points) and len(points) == len(set(points)), node
    assert check_identical_parameters(job.commits()) > 30
    done = [r for r in job.records() if r["event"] == "done"]
    assert len(done) == 3 and len({d["params"] for d in done}) == 1, "members differ at the end"
    assert during > 0, "training stopped while etcd had no quorum"
    # The job said what happened, and where it connects.
    assert "now using member" in output, output
    assert "Waiting up to" in output and "etcd answers again" in output, output
