"""Elasticity end to end: real horderun, real etcd, real worker processes and signals."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.elastic.conftest import Job, check_identical_parameters

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SLOW = {"TEST_STEP_DELAY": "0.08", "TEST_EPOCHS": "3"}


def _sizes_after(job: Job, t: float) -> set[int]:
    return {c["size"] for c in job.commits() if c["time"] > t}


def _commits_of(job: Job, node: str) -> list[dict]:
    return [c for c in job.commits() if c["node"] == node]


def _nodes(job: Job) -> list[str]:
    return sorted({r["node"] for r in job.records()})


def _kill_one_of_three(job: Job, env: dict[str, str]) -> float:
    """Run 3 workers (--min-np 2), SIGKILL rank 2 once they commit, let the survivors
    finish; check that they were not restarted and rolled back to a commit. Returns when
    the kill happened."""
    job.horderun("-np", "3", "--min-np", "2", "--max-np", "3", env=env)
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 3 and len(job.commits()) >= 9,
             60, "three workers committing")
    before = job.pids_by_node()
    victim = job.latest_pid(rank=2)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    job.wait(lambda: 2 in _sizes_after(job, killed_at), 30, "commits of the 2 survivors")
    codes = job.finish()
    assert codes == [0], job.output()
    after = job.pids_by_node()
    survivors = [n for n, pids in after.items() if victim not in pids]
    assert len(survivors) == 2
    for node in survivors:
        assert after[node] == before[node], "a surviving worker was restarted"
    restarts = [r for r in job.records() if r["event"] == "start" and r["time"] > killed_at]
    assert restarts, "the survivors never restarted their training function"
    # A survivor may commit once more between the kill and the collective that fails:
    # any commit of the first generation is a valid rollback point.
    committed = {c["params"] for c in job.commits() if c["generation"] < restarts[0]["generation"]}
    assert all(r["params"] in committed for r in restarts), \
        "survivors did not roll back to a committed state"
    assert len({r["params"] for r in restarts}) == 1, "survivors restarted from different states"
    return killed_at


def test_sigkill_survivors_roll_back_and_continue_without_restart(job: Job) -> None:
    killed_at = _kill_one_of_three(job, SLOW)
    recovery = min(c["time"] for c in job.commits() if c["time"] > killed_at and c["size"] == 2)
    assert check_identical_parameters(job.commits()) > 5
    done = [r for r in job.records() if r["event"] == "done"]
    assert len(done) == 2 and len({d["params"] for d in done}) == 1
    print(f"recovery from SIGKILL to first commit: {recovery - killed_at:.2f} s")


def test_staleness_with_topk_goes_on_in_place_after_a_sigkill(job: Job) -> None:
    """Bounded staleness and top-k (what volunteers on home links run) across a
    membership change: survivors go on in place from one commit, end with identical
    parameters, and their statistics span the generations."""
    killed_at = _kill_one_of_three(job, {**SLOW, "TEST_STALENESS": "1", "TEST_TOPK": "0.05"})
    done = [r for r in job.records() if r["event"] == "done"]
    assert len(done) == 2 and len({d["params"] for d in done}) == 1, "members' parameters differ"
    for d in done:
        stats = d["stats"]
        assert stats["mode"] == "staleness" and stats["density"] == 0.05, stats
        assert max(int(s) for s in stats["staleness_histogram"]) <= 1
        # Counted over both generations: more rounds than any commit before the kill saw.
        earlier = [c["stats"]["rounds"] for c in job.commits()
                   if c["node"] == d["node"] and c["time"] < killed_at]
        assert earlier and stats["rounds"] > max(earlier), (stats, max(earlier))


def test_sigstop_hung_worker_is_dropped_then_rejoins(job: Job) -> None:
    job.horderun("-np", "3", "--min-np", "2", "--max-np", "3",
                 env={**SLOW, "TEST_EPOCHS": "4"})
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 3, 60, "three workers")
    victim = job.latest_pid(rank=1)
    stopped_at = time.time()
    os.kill(victim, signal.SIGSTOP)
    try:
        job.wait(lambda: len([c for c in job.commits()
                              if c["time"] > stopped_at and c["size"] == 2]) >= 4,
                 30, "the two others to go on while one is stopped")
    finally:
        os.kill(victim, signal.SIGCONT)
    resumed_at = time.time()
    job.wait(lambda: any(c["size"] == 3 and c["time"] > resumed_at and c["pid"] == victim
                         for c in job.commits()), 60, "the stopped worker to rejoin")
    assert job.finish() == [0], job.output()
    check_identical_parameters(job.commits())


def test_graceful_leave_loses_no_committed_work(job: Job) -> None:
    job.horderun("-np", "3", "--min-np", "2", "--max-np", "3", env=SLOW)
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 3 and len(job.commits()) >= 6,
             60, "three workers committing")
    leaver = job.latest_pid(rank=2)
    asked_at = time.time()
    os.kill(leaver, signal.SIGTERM)
    job.wait(lambda: 2 in _sizes_after(job, asked_at), 30, "the two others to go on")
    assert job.finish() == [0], job.output()
    last = [r for r in job.records() if r["pid"] == leaver][-1]
    assert last["event"] == "commit", "the leaver did not leave right after a commit"
    check_identical_parameters(job.commits())
    assert "left" in job.output() or "leav" in job.output()


def test_several_joins_cost_one_reset_and_receive_the_state(job: Job) -> None:
    job.horderun("-np", "2", "--min-np", "2", "--max-np", "5",
                 env={**SLOW, "TEST_EPOCHS": "10"})
    job.wait(lambda: len(job.commits()) >= 6, 60, "two workers committing")
    joined_at = time.time()
    job.horderun("-np", "3", join=True, env={**SLOW, "TEST_EPOCHS": "10"})
    job.wait(lambda: 5 in _sizes_after(job, joined_at), 60, "five workers committing")
    sizes = [c["size"] for c in job.commits() if c["time"] > joined_at]
    generations = sorted({c["generation"] for c in job.commits()})
    assert 3 not in sizes and 4 not in sizes, f"joins were not batched: sizes {sizes}"
    assert generations[:2] == [0, 1], f"expected one reset, saw generations {generations}"
    codes = job.finish()
    assert codes == [0, 0], job.output()
    starts = [r for r in job.records() if r["event"] == "start" and r["generation"] == 1]
    assert len(starts) == 5 and len({s["params"] for s in starts}) == 1, \
        "the newcomers did not receive the current state"
    check_identical_parameters(job.commits())


def test_blacklisted_node_is_kept_out_for_its_cooldown(job: Job) -> None:
    job.horderun("-np", "3", "--min-np", "2", "--max-np", "3",
                 "--blacklist-cooldown-range", "6", "6", env={**SLOW, "TEST_EPOCHS": "5"})
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 3, 60, "three workers")
    target = sorted({c["node"] for c in job.commits() if c["rank"] == 2})[0]
    import subprocess
    import sys

    evicted_at = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "elastic.launcher.cli", "--rendezvous", job.etcd_url, "--job",
         job.name, "--evict", target, "--reason", "test eviction"],
        capture_output=True, text=True, timeout=30, env=job.env())
    assert result.returncode == 0, result.stderr
    job.wait(lambda: 2 in _sizes_after(job, evicted_at), 30, "the job to drop the node")
    dropped = min(c["generation"] for c in job.commits()
                  if c["time"] > evicted_at and c["size"] == 2)
    job.wait(lambda: any(c["node"] == target and c["generation"] > dropped
                         for c in job.commits()), 60, "the node to return after its cooldown")
    back = min(c["time"] for c in job.commits()
               if c["node"] == target and c["generation"] > dropped)
    assert back - evicted_at >= 6, f"re-admitted after {back - evicted_at:.1f} s, before cooldown"
    assert job.finish() == [0], job.output()


def test_below_min_np_waits_then_recovers_when_a_worker_joins(job: Job) -> None:
    job.horderun("-np", "2", "--min-np", "2", "--max-np", "3",
                 env={**SLOW, "TEST_EPOCHS": "3"})
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 2, 60, "two workers")
    victim = job.latest_pid(rank=1)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    time.sleep(3)
    assert not [c for c in job.commits() if c["time"] > killed_at + 1], \
        "the job trained below min_np"
    job.horderun("-np", "1", join=True, env=SLOW)
    job.wait(lambda: 2 in _sizes_after(job, killed_at), 60, "training to resume with 2")
    assert job.finish() == [0, 0], job.output()


def test_below_min_np_past_elastic_timeout_fails_clearly(job: Job) -> None:
    job.horderun("-np", "2", "--min-np", "2", "--max-np", "2", "--elastic-timeout", "3",
                 env={**SLOW, "TEST_EPOCHS": "20"})
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 2, 60, "two workers")
    os.kill(job.latest_pid(rank=1), signal.SIGKILL)
    codes = job.finish(60)
    assert codes[0] not in (0, None), job.output()


def test_leader_death_fails_over(job: Job) -> None:
    from rendezvous import backend_from_url
    from rendezvous.keys import JobKeys

    job.horderun("-np", "3", "--min-np", "2", "--max-np", "3", env=SLOW)
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 3, 60, "three workers")
    backend = backend_from_url(job.etcd_url)
    keys = JobKeys("horde", job.name)
    leader = backend.get(keys.leader).value.decode()
    pid = [c["pid"] for c in job.commits() if c["node"] == leader][-1]
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    job.wait(lambda: 2 in _sizes_after(job, killed_at), 30, "a new leader's generation")
    new_leader = backend.get(keys.leader)
    assert new_leader is not None and new_leader.value.decode() != leader
    assert job.finish() == [0], job.output()
    backend.close()


def test_reset_limit_stops_the_job(job: Job) -> None:
    job.horderun("-np", "3", "--min-np", "1", "--max-np", "3", "--reset-limit", "0",
                 env={**SLOW, "TEST_EPOCHS": "20"})
    job.wait(lambda: len({c["node"] for c in job.commits()}) == 3, 60, "three workers")
    os.kill(job.latest_pid(rank=2), signal.SIGKILL)
    codes = job.finish(60)
    assert codes[0] not in (0, None)
    assert "--reset-limit=0" in job.output()
