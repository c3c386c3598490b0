"""The gradient channel's in-band checks, on buckets whose tail a test writes."""

from __future__ import annotations

import threading

import pytest
import torch

from elastic.core.gradients import GradientChannel
from elastic.errors import CollectiveMismatchError, HorovodInternalError
from tests.torch_api.test_gloo_wait import ScriptedWork


def channel(size: int = 3, interrupted: bool = False) -> GradientChannel:
    event = threading.Event()
    if interrupted:
        event.set()
    ch = GradientChannel(group=None, rank=0, size=size, interrupted=event)  # type: ignore[arg-type]
    ch.arm(0, [(4, torch.float32)])
    return ch


def reduced_bucket(contributors: list[int], signatures: list[int], size: int = 3
                   ) -> torch.Tensor:
    """What the allreduce of a 4-element bucket returns when `contributors` sent it."""
    flat = torch.zeros(4 + size + 1)
    for rank, sig in zip(contributors, signatures):
        flat[4 + rank] += 1.0
        flat[4 + size] += sig
    return flat


def test_the_tail_says_how_many_ranks_contributed() -> None:
    ch = channel()
    done = ScriptedWork(["ok"], [])
    assert ch.finish(done, reduced_bucket([0, 1, 2], [3, 3, 3]), index=2) == 3
    assert ch.active


def test_a_step_with_a_joined_rank_turns_the_channel_off() -> None:
    ch = channel()
    assert ch.finish(ScriptedWork(["ok"], []), reduced_bucket([0, 2], [1, 1]), index=0) == 2
    assert not ch.active


def test_ranks_that_sent_different_buckets_fail_with_a_mismatch_error() -> None:
    ch = channel()
    with pytest.raises(CollectiveMismatchError, match="did not send bucket 1 together"):
        ch.finish(ScriptedWork(["ok"], []), reduced_bucket([0, 1, 2], [2, 2, 3]), index=1)
    assert not ch.active


def test_a_membership_change_interrupts_a_direct_bucket() -> None:
    ch = channel(interrupted=True)
    with pytest.raises(HorovodInternalError, match="interrupted"):
        ch.finish(ScriptedWork(["slice"], [False]), reduced_bucket([0, 1, 2], [1, 1, 1]), 0)


def test_only_float_plans_arm_and_the_last_optimizer_armed_is_served() -> None:
    event = threading.Event()
    ch = GradientChannel(group=None, rank=0, size=2, interrupted=event)  # type: ignore[arg-type]
    ch.arm(0, [(4, torch.float16)])
    assert not ch.active
    ch.arm(0, [(4, torch.float32)])
    assert ch.serves(0)
    ch.arm(1, [(8, torch.float32)])
    assert ch.serves(1) and not ch.serves(0)
