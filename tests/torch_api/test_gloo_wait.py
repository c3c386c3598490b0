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
