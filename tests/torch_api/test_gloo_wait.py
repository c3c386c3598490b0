"""How the engine and the gradient channel wait for a Gloo work: in slices,
interruptible, and without mistaking a slice that ran out as the work finished for a
failed collective."""

from __future__ import annotations

import threading

import pytest

from elastic.core.transport import wait_interruptibly
from elastic.errors import HorovodInternalError


class ScriptedWork:
    """A torch.distributed work whose wait() follows a script of outcomes."""

    def __init__(self, waits: list[str], completed: list[bool]) -> None:
        self.waits = list(waits)
        self.completed = list(completed)

    def wait(self, timeout: object = None) -> bool:
        outcome = self.waits.pop(0)
        if outcome == "slice":
            raise RuntimeError("Operation timed out!")
        if outcome == "error":
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
        return True

    def is_completed(self) -> bool:
        return self.completed.pop(0)


def wait(work: ScriptedWork, interrupted: bool = False) -> None:
    event = threading.Event()
    if interrupted:
        event.set()
    wait_interruptibly(work, event, "a collective")


def test_slices_that_run_out_are_waited_again_until_the_work_finishes() -> None:
    work = ScriptedWork(["slice", "slice", "ok"], [False, False])
    wait(work)
    assert work.waits == []


def test_a_work_that_finishes_just_after_its_slice_ran_out_is_a_success() -> None:
    work = ScriptedWork(["slice", "ok"], [True])
    wait(work)
    assert work.waits == []


def test_a_failed_work_raises_horovod_internal_error_with_the_cause() -> None:
    work = ScriptedWork(["error", "error"], [True])
    with pytest.raises(HorovodInternalError, match="collective failed: Connection closed"):
        wait(work)


def test_a_membership_change_interrupts_the_wait() -> None:
    work = ScriptedWork(["slice"], [False])
    with pytest.raises(HorovodInternalError, match="interrupted"):
        wait(work, interrupted=True)


def test_a_process_set_whose_peer_never_connects_gives_up_on_a_membership_change() -> None:
    """The staleness rounds and process sets connect a group of their own; a member that
    died before connecting must not hold the others for the group's whole timeout
    (a SIGKILL in the first step of a generation did, and the survivors hung)."""
    import time

    from elastic.core.transport import Transport, serve_store

    store = serve_store("127.0.0.1", timeout=60)
    world = object.__new__(Transport)  # rank 0 of 2; rank 1 never arrives
    world.namespace, world.rank, world.size, world.timeout = "t/", 0, 2, 60.0
    world.relay, world.reachable, world._children = "", True, []  # a direct Gloo generation
    world._store, world._bind_host = store, "127.0.0.1"
    interrupted = threading.Event()
    threading.Timer(0.5, interrupted.set).start()
    started = time.monotonic()
    with pytest.raises(HorovodInternalError, match="process set 7 was interrupted"):
        world.subset([0, 1], 7, interrupted)
    assert time.monotonic() - started < 10



ABANDONED_CONNECT = """
import sys, threading
import elastic.core.transport as transport
store = transport.connect_store("127.0.0.1", int(sys.argv[1]), 60)
world = object.__new__(transport.Transport)
world.namespace, world.rank, world.size, world.timeout = "t/", 0, 2, 60.0
world.relay, world.reachable, world._children = "", True, []  # a direct Gloo generation
world._store, world._bind_host = store, "127.0.0.1"
store.set("t/ps7/arrived/1", b"1")  # rank 1 arrives, then dies before Gloo pairs
interrupted = threading.Event()
threading.Timer(0.5, interrupted.set).start()
try:
    world.subset([0, 1], 7, interrupted)
except Exception as exc:
    print("interrupted:", exc, flush=True)
print("exiting", flush=True)
sys.exit(3)
"""


def test_a_connect_given_up_inside_gloo_does_not_abort_the_process_at_exit() -> None:
    """A member killed while a group paired left the others' connect thread inside Gloo;
    when the store's host (rank 0) went away as that process exited, it died of SIGABRT
    instead of exiting with its own code."""
    import subprocess
    import sys

    from elastic.core.transport import serve_store

    store = serve_store("127.0.0.1", timeout=60)
    child = subprocess.Popen([sys.executable, "-c", ABANDONED_CONNECT, str(store.port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = []
        for line in child.stdout:  # type: ignore[union-attr]
            out.append(line)
            if line.startswith("exiting"):
                del store  # the store's host exits too
                break
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert any("process set 7 was interrupted" in line for line in out), out
    assert child.returncode == 3, err[-2000:]
