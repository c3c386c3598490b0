"""A hostile member's announced allgather/alltoall sizes (HORDE_MAX_ALLGATHER_BYTES).

Real worker processes against a real etcd, in one real Gloo group; the last rank plays a
member whose client was modified to announce, where a tensor allgather or alltoall
exchanges sizes, 2^40 rows or a negative count (tests/security/scripts/
allgather_worker.py). Before the cap every honest rank tried to allocate 2^40 rows (16
TiB here) and failed with an allocator error wrapped in HorovodInternalError (or hung on
a negative count); now every rank refuses with AllgatherSizeError naming the rank, the
size and the setting, nothing is allocated, the collectives stay in step and ordinary
uneven allgathers still work. In synchronous top-k, a message whose header no decoder
accepts costs its sender that step's gradient (before, every rank's step raised
SparsePayloadError).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from elastic.errors import AllgatherSizeError
from elastic.settings import WorkerSettings
from tests.harness import Workers, python, unique_job, worker_env

SCRIPT = Path(__file__).resolve().parent / "scripts" / "allgather_worker.py"
NP = 3
HUGE = 2 ** 40


def run_workers(etcd_url: str, out: Path, limit: float = 120, **extra: str
                ) -> tuple[dict[int, dict[str, Any]], str]:
    env = worker_env(etcd_url, unique_job("sec-allgather"), NP,
                     extra={"OUT": str(out), **extra})
    workers = Workers()
    deadline = time.monotonic() + limit
    try:
        for i in range(NP):
            workers.start(python(SCRIPT), env, out / f"worker{i}.log")
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in workers.procs) or \
                    all((out / f"rank{r}.json").exists() for r in range(NP)):
                break
            time.sleep(0.2)
    finally:
        workers.kill_all()
    output = workers.all_output()
    results = {}
    for rank in range(NP):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no results\n{output}"
        results[rank] = json.loads(path.read_text())
    return results, output


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_huge_or_negative_announced_part_is_refused_before_anything_is_allocated(
        etcd_server: Any, tmp_path: Path) -> None:
    results, output = run_workers(etcd_server.url, tmp_path)
    attacker = NP - 1
    for rank in range(NP):  # the attacker runs this code too, so it refuses alike
        got = results[rank]
        for what in ("huge_rows", "grouped", "alltoall"):
            assert got[what]["raised"] == "AllgatherSizeError", (rank, what, got[what], output)
            message = got[what]["message"]
            assert f"rank {attacker}: {HUGE} rows of 16 bytes" in message, message
            assert "HORDE_MAX_ALLGATHER_BYTES=1073741824" in message, message
            assert "nothing was allocated" in message and "every worker" in message, message
        negative = got["negative_rows"]
        assert negative["raised"] == "AllgatherSizeError", (rank, negative, output)
        assert f"rank {attacker}: -3 rows" in negative["message"], negative["message"]
        topk = got["topk"]  # a malformed top-k message costs its sender the step's gradient
        assert topk["error"] is None, (rank, topk, output)
        assert (topk["rejected"], topk["rounds"]) == (1, 4), topk
        assert topk["params"] == results[0]["topk"]["params"], "ranks' parameters differ"
        assert got["after"] == NP, got
        assert got["uneven"]["value"] == [[6, 3], [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]], got
        assert got["max_rss_bytes"] < 2 ** 31, got["max_rss_bytes"]
    assert "refused a part larger than HORDE_MAX_ALLGATHER_BYTES" in output  # logged too
    assert f"top-k: rejected the gradient of rank {attacker}: bad payload magic" in output


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_honest_part_over_a_lower_cap_is_refused_on_every_rank_alike(
        etcd_server: Any, tmp_path: Path) -> None:
    # HORDE_MAX_ALLGATHER_BYTES=32: the 2-row parts of 16 bytes pass, but rank 2's part of
    # the uneven allgather (3 rows of 12 bytes) does not: every rank refuses it, itself
    # included, so nobody waits in a collective the others left, and the job ends cleanly.
    results, output = run_workers(etcd_server.url, tmp_path, HORDE_MAX_ALLGATHER_BYTES="32")
    for rank in range(NP):
        got = results[rank]
        assert "HORDE_MAX_ALLGATHER_BYTES=32" in got["huge_rows"]["message"], got
        assert got["after"] == NP, got
        # top-k's own messages (about 100 bytes here) are never refused by the setting
        assert got["topk"]["error"] is None and got["topk"]["rounds"] == 4, got["topk"]
        uneven = got["uneven"]
        assert uneven["raised"] == "AllgatherSizeError", (rank, uneven, output)
        assert "(rank 2: 3 rows of 12 bytes, 36 bytes)" in uneven["message"], uneven


def test_the_cap_defaults_to_the_object_cap_and_is_read_from_the_environment() -> None:
    assert WorkerSettings.from_env({}).max_allgather_bytes == 1 << 30
    assert WorkerSettings.from_env(
        {"HORDE_MAX_OBJECT_BYTES": "4096"}).max_allgather_bytes == 4096
    assert WorkerSettings.from_env({"HORDE_MAX_OBJECT_BYTES": "4096",
                                    "HORDE_MAX_ALLGATHER_BYTES": "99"}).max_allgather_bytes == 99
    with pytest.raises(ValueError, match="HORDE_MAX_ALLGATHER_BYTES=0 must be > 0"):
        WorkerSettings.from_env({"HORDE_MAX_ALLGATHER_BYTES": "0"})
    assert issubclass(AllgatherSizeError, ValueError)


def test_an_honest_bound_given_by_horde_s_own_exchanges_raises_the_cap_never_lowers_it(
        ) -> None:
    # The check alone (its real-process use is above): synchronous top-k and staleness
    # rounds pass the most an honest member sends, so a large model's gradient messages
    # are never refused, whatever HORDE_MAX_ALLGATHER_BYTES says.
    from types import SimpleNamespace

    from elastic.core.engine import CollectiveEngine

    engine = CollectiveEngine.__new__(CollectiveEngine)
    engine.max_part_bytes = 100
    world = SimpleNamespace(members=None, size=3)
    engine._check_parts("allgather", world, [[10], [100], [0]], 1)  # at the cap: fine
    engine._check_parts("allgather", world, [[10], [5000], [0]], 1, honest_part_bytes=5000)
    with pytest.raises(AllgatherSizeError) as info:
        engine._check_parts("allgather", world, [[10], [5001], [-1]], 1,
                            honest_part_bytes=5000)
    assert info.value.ranks == (1, 2)
    assert "rank 2: -1 rows" in str(info.value)  # a negative count is named first
    with pytest.raises(AllgatherSizeError) as info:
        engine._check_parts("allgather", world, [[10], [5001], [0]], 1, honest_part_bytes=5000)
    assert "larger than 5000 bytes, the most an honest member sends here " \
           "(HORDE_MAX_ALLGATHER_BYTES=100) (rank 1: 5001 rows of 1 bytes" in str(info.value)
    # process sets name global ranks; rows of zero bytes still count as one byte each
    subset = SimpleNamespace(members=(4, 7), size=2)
    with pytest.raises(AllgatherSizeError, match="rank 7: 101 rows of 0 bytes"):
        engine._check_parts("alltoall", subset, [[1, 1], [0, 101]], 0)
