"""A joined rank's wait while its zero step is offered on the gradient channel: the
others taking the offer settles it, and a membership change ends the wait."""

from __future__ import annotations

import threading

import pytest
import torch

from elastic.core.engine import CollectiveEngine
from elastic.core.gradients import GradientChannel, JoinOffer
from elastic.core.transport import wait_interruptibly
from elastic.errors import HorovodInternalError


class Work:
    """A work that completes after `polls` looks at it (never when polls is None)."""

    def __init__(self, polls: int | None) -> None:
        self.polls = polls

    def is_completed(self) -> bool:
        if self.polls is None:
            return False
        self.polls -= 1
        return self.polls < 0

    def wait(self, timeout: object = None) -> bool:
        if not self.is_completed():
            raise RuntimeError("Operation timed out!")
        return True


def joined_engine(interrupted: bool = False) -> CollectiveEngine:
    eng = CollectiveEngine.__new__(CollectiveEngine)
    eng.interrupted = threading.Event()
    if interrupted:
        eng.interrupted.set()
    eng._rounds = iter(range(1000))
    eng.stall = None
    eng.gradients = GradientChannel(group=None, rank=1, size=2,  # type: ignore[arg-type]
                                    interrupted=eng.interrupted)
    eng.gradients.arm(0, [(4, torch.float32)] * 2)
    eng._wait = lambda work, group=None: wait_interruptibly(  # type: ignore[method-assign]
        work, eng.interrupted, "a collective")
    return eng


class Transport:
    gloo = None


def test_the_others_taking_the_offered_step_settles_it_and_turns_the_channel_off() -> None:
    eng = joined_engine()
    offer = JoinOffer([Work(0), Work(0)], [])
    negotiation = Work(3)
    assert eng._wait_negotiation(negotiation, Transport(), offer) is None
    assert not eng.gradients.active
    assert next(eng._rounds) == 2  # the step's two buckets were counted


def test_a_negotiation_that_completes_first_keeps_the_offer_open() -> None:
    eng = joined_engine()
    offer = JoinOffer([Work(None), Work(None)], [])
    assert eng._wait_negotiation(Work(2), Transport(), offer) is offer
    assert eng.gradients.active


def test_a_membership_change_ends_the_wait_of_a_joined_rank() -> None:
    eng = joined_engine(interrupted=True)
    offer = JoinOffer([Work(None), Work(None)], [])
    with pytest.raises(HorovodInternalError, match="join\\(\\) was interrupted"):
        eng._wait_negotiation(Work(None), Transport(), offer)
