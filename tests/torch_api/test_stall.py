"""Stall inspection: ranks that run different collectives are named long before the
collective timeout, and a stall-shutdown time fails them with CollectiveStallError."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from elastic.core.stall import Activity, StallInspector, read_activity
from elastic.errors import CollectiveStallError
from elastic.settings import WorkerSettings, horovod_notes
from rendezvous.keys import JobKeys
from rendezvous.memory import MemoryBackend
from tests.harness import horderun, repo_env

WORKER = str(Path(__file__).resolve().parent / "scripts" / "stall_worker.py")
COLLECTIVE_TIMEOUT = 90.0


@pytest.mark.timeout(150)
def test_uneven_batches_under_distributed_optimizer_warn_then_shut_down() -> None:
    """Rank 1 trains one batch more: it waits in a direct gradient bucket while rank 0
    waits in the metric allreduce. Each names the other long before the timeout."""
    started = time.monotonic()
    result = horderun(
        "-np", "2", "--coordinator", "none", "--collective-timeout", str(COLLECTIVE_TIMEOUT),
        sys.executable, WORKER,
        env=repo_env(STALL_SCENARIO="batches", HOROVOD_STALL_CHECK_TIME_SECONDS="2",
                     HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="6"),
        timeout=140)
    elapsed = time.monotonic() - started
    err = result.stderr
    assert result.returncode != 0, err
    warning = re.search(r"\[0\]<stderr>:.*WARNING: Stall: rank 0 has waited \d+ s in allreduce "
                        r"'metric' \(shape \[1\], torch.float32\).*ranks that have not "
                        r"submitted it: rank 1 \(waiting in DistributedOptimizer gradient "
                        r"bucket 0 .*on the gradient channel", err)
    assert warning, err
    assert re.search(r"\[1\]<stderr>:.*WARNING: Stall: rank 1 has waited \d+ s in "
                     r"DistributedOptimizer gradient bucket 0.*rank 0 \(waiting in allreduce "
                     r"'metric'", err), err
    assert "CollectiveStallError" in err and "stall-shutdown time (6 s" in err, err
    assert "HorovodInternalError" not in err, err
    assert elapsed < COLLECTIVE_TIMEOUT, f"took {elapsed:.0f} s: the collective timed out"


# -- the inspector's decisions, on a board kept in the in-memory rendezvous backend ---------

class Board:
    """Records published the way workers publish them (one key per node), read back."""

    def __init__(self) -> None:
        self.backend = MemoryBackend()
        self.keys = JobKeys("horde", "job")

    def publisher(self, node: str):  # type: ignore[no-untyped-def]
        def publish(value: bytes | None) -> None:
            key = self.keys.activity_node(node)
            if value is None:
                self.backend.delete(key)
            else:
                self.backend.put(key, value)
        return publish

    def read(self) -> dict[str, Activity]:
        return read_activity(self.backend, self.keys.activity)


def inspector(board: Board, rank: int, size: int = 3, check: float = 10.0,
              shutdown: float = 0.0) -> StallInspector:
    ins = StallInspector(f"n{rank}", rank, size, 7, check, shutdown, 60.0,
                         publish=board.publisher(f"n{rank}"), read=board.read, monitor=False)
    return ins


def test_a_rank_names_peers_in_another_collective_and_peers_in_none(
        caplog: pytest.LogCaptureFixture) -> None:
    board = Board()
    me, peer = inspector(board, 0), inspector(board, 1)
    t0 = time.monotonic()
    peer.enter("DistributedOptimizer gradient bucket 2", t0 - 6)
    peer.inspect(t0)  # past half the check time: published
    assert board.read()["n1"].what == "DistributedOptimizer gradient bucket 2"
    me.enter("allreduce 'loss'", t0 - 11)
    with caplog.at_level("WARNING", logger="elastic.core.stall"):
        me.inspect(t0)
    text = caplog.text
    assert "rank 0 has waited 11 s in allreduce 'loss' (generation 7)" in text
    assert "rank 1 (waiting in DistributedOptimizer gradient bucket 2 for 6 s)" in text
    assert "rank 2 (not in a collective" in text
    assert me.error is None  # no shutdown time: warn only


def test_the_record_is_cleared_when_the_wait_ends_and_peers_in_it_are_not_missing(
        caplog: pytest.LogCaptureFixture) -> None:
    board = Board()
    me, peer = inspector(board, 0, size=2), inspector(board, 1, size=2)
    t0 = time.monotonic()
    token = peer.enter("barrier (unnamed)", t0 - 6)
    peer.inspect(t0)
    me.enter("barrier (unnamed)", t0 - 12)
    with caplog.at_level("WARNING", logger="elastic.core.stall"):
        me.inspect(t0)
    assert "every other rank waits in it too" in caplog.text
    peer.leave(token)
    peer.inspect(t0 + 1)
    assert "n1" not in board.read()


def test_shutdown_fails_the_waits_with_a_stall_error_but_join_never_stalls() -> None:
    board = Board()
    me = inspector(board, 0, size=2, check=2.0, shutdown=4.0)
    t0 = time.monotonic()
    joined = me.enter("hvd.join()", t0 - 100, check=False)
    me.inspect(t0)
    assert me.error is None
    me.leave(joined)
    me.enter("allgather 'x'", t0 - 3)
    me.inspect(t0)
    assert me.error is None  # warned, not yet shut down
    me.inspect(t0 + 1.5)
    with pytest.raises(CollectiveStallError, match="allgather 'x'.*rank 1 \\(not in a "
                       "collective.*stall-shutdown time \\(4 s"):
        me.raise_if_failed()


def test_peer_records_are_data_checked_and_cut_short() -> None:
    board = Board()
    board.backend.put(board.keys.activity_node("bad"), b"not json")
    board.backend.put(board.keys.activity_node("long"), Activity(
        "long", 1, 0, "x\x1b[2J" + "y" * 500, 0.0).to_json())
    records = board.read()
    assert "bad" not in records
    assert records["long"].what.startswith("x?[2J") and len(records["long"].what) == 200


def test_a_real_wait_is_entered_only_after_its_first_slice() -> None:
    """wait_interruptibly enters a wait that outlasts a slice and leaves it when done."""
    from elastic.core.transport import wait_interruptibly
    from tests.torch_api.test_gloo_wait import ScriptedWork

    board = Board()
    me = inspector(board, 0, size=2)
    seen: list[int] = []
    original = me.enter

    def spy(*args: object, **kwargs: object) -> int:
        token = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(len(me._waits))
        return token

    me.enter = spy  # type: ignore[method-assign]
    wait_interruptibly(ScriptedWork(["ok"], []), threading.Event(), "x", me, "fast")
    assert seen == []
    wait_interruptibly(ScriptedWork(["slice", "slice", "ok"], [False, False]),
                       threading.Event(), "x", me, "slow")
    assert seen == [1] and me._waits == {}


# -- settings ---------------------------------------------------------------------------

def test_stall_settings_follow_horovod_and_stay_below_the_collective_timeout() -> None:
    default = WorkerSettings.from_env({"HORDE_COLLECTIVE_TIMEOUT": "30"})
    assert default.stall_check_seconds == 15.0 and default.stall_shutdown_seconds == 0.0
    assert WorkerSettings.from_env({}).stall_check_seconds == 30.0
    set_ = WorkerSettings.from_env({"HOROVOD_STALL_CHECK_TIME_SECONDS": "2",
                                    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5"})
    assert (set_.stall_check_seconds, set_.stall_shutdown_seconds) == (2.0, 5.0)
    off = WorkerSettings.from_env({"HOROVOD_STALL_CHECK_DISABLE": "1",
                                   "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5"})
    assert (off.stall_check_seconds, off.stall_shutdown_seconds) == (0.0, 0.0)
    below = WorkerSettings.from_env({"HOROVOD_STALL_CHECK_TIME_SECONDS": "10",
                                     "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5"})
    assert below.stall_shutdown_seconds == 0.0  # as Horovod: below the check time, never
    assert any("will not be shut down" in n for n in horovod_notes(below, {}))
    with pytest.raises(ValueError, match="HOROVOD_STALL_CHECK_TIME_SECONDS='soon'"):
        WorkerSettings.from_env({"HOROVOD_STALL_CHECK_TIME_SECONDS": "soon"})
    with pytest.raises(ValueError, match="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=-1"):
        WorkerSettings.from_env({"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "-1"})
