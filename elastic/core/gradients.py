"""The steady-state gradient channel: DistributedOptimizer buckets without negotiation.

Every engine collective is negotiated (one allgather of a description) and runs on the
engine thread. For an optimizer's gradient buckets that costs more than the allreduce
itself on a small model. Their shapes cannot change, so once a step has gone through the
negotiated path on every rank (which checks that the ranks agree), the optimizer sends
the following steps' buckets straight to a Gloo group of their own, from its own thread,
as DDP does.

What negotiation gave, the channel keeps in-band. Each bucket carries a small tail that
the allreduce sums with the gradients: one slot per rank (1 when that rank contributes,
0 when it has joined) and a bucket signature. The sum says how many ranks contributed
(the divisor of an average) and whether every rank sent the same bucket. A rank inside
`hvd.join()` cannot know whether the others will send another step or a negotiated
collective, so it offers both: a step of zero buckets on this channel and the usual
negotiation on the engine's group; whichever the others use completes. A step in which
somebody had joined turns the channel off on every rank (they all see the same sums),
and the next complete negotiated step turns it on again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from elastic.core.stall import StallInspector
from elastic.core.transport import wait_interruptibly
from elastic.errors import CollectiveMismatchError

DTYPES = (torch.float32, torch.float64)


@dataclass
class JoinOffer:
    """The zero buckets a joined rank posted for one step of the others."""

    works: list[Any]
    buffers: list[torch.Tensor]


class GradientChannel:
    """Direct allreduce of one optimizer's buckets on the generation's gradient group."""

    def __init__(self, group: dist.ProcessGroupGloo, rank: int, size: int,
                 interrupted: threading.Event, stall: StallInspector | None = None) -> None:
        self.group = group
        self.stall = stall
        self.rank = rank
        self.size = size
        self.interrupted = interrupted
        self.tail = size + 1
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._plan: list[tuple[int, torch.dtype]] = []
        self.active = False

    # -- arming -----------------------------------------------------------------------

    def arm(self, owner: int, plan: list[tuple[int, torch.dtype]]) -> None:
        """After a negotiated step of optimizer `owner` (a number this process never
        gives another optimizer) that every rank completed without joined ranks: send its
        next steps directly. `plan`: (numel, dtype) of each bucket's gradients. The channel
        serves one optimizer at a time, the last one armed."""
        with self._lock:
            if any(dtype not in DTYPES for _n, dtype in plan) or not plan:
                return
            self._owner, self._plan, self.active = owner, list(plan), True

    def disarm(self) -> None:
        """Back to negotiated steps (someone joined, or the plan changed)."""
        with self._lock:
            self.active = False

    def serves(self, owner: int) -> bool:
        return self.active and self._owner == owner

    # -- the owner's buckets ------------------------------------------------------------

    def start(self, flat: torch.Tensor, index: int) -> Any:
        """Fill the tail of `flat` (gradients first) and start its allreduce."""
        tail = flat[flat.numel() - self.tail:]
        tail.zero_()
        tail[self.rank] = 1.0
        tail[self.size] = float(index + 1)
        return self.group.allreduce([flat])

    def finish(self, work: Any, flat: torch.Tensor, index: int) -> int:
        """Wait for a bucket; returns how many ranks contributed to it."""
        self.wait(work, lambda: f"DistributedOptimizer gradient bucket {index} "
                  f"({flat.numel() - self.tail} x {flat.dtype}, on the gradient channel)")
        tail = flat[flat.numel() - self.tail:].tolist()
        count = round(sum(tail[:self.size]))
        if round(tail[self.size]) != count * (index + 1):
            self.disarm()
            raise CollectiveMismatchError(
                "Mismatched DistributedOptimizer buckets across ranks: the ranks did not "
                f"send bucket {index} together (check that every rank builds the same model "
                "and optimizer and steps it the same number of times)")
        if count < self.size:
            self.disarm()
        return count

    def wait(self, work: Any, describe: str | Callable[[], str] | None = None) -> None:
        """Wait in slices so that a membership change interrupts the wait; `describe`
        names the bucket in stall messages."""
        wait_interruptibly(work, self.interrupted, "a gradient allreduce", self.stall,
                           describe or "a DistributedOptimizer gradient bucket")

    # -- joined ranks -------------------------------------------------------------------

    def offer_join(self) -> JoinOffer | None:
        """When the channel is on: post one step of zero buckets (this rank contributes
        nothing) for the others' next direct step, if that is what they do next."""
        with self._lock:
            if not self.active:
                return None
            plan = list(self._plan)
        buffers = [torch.zeros(numel + self.tail, dtype=dtype) for numel, dtype in plan]
        return JoinOffer([self.group.allreduce([b]) for b in buffers], buffers)

    def settle_join(self, offer: JoinOffer) -> int:
        """The others took (or everyone posted) the offered step: wait for all of its
        buckets; the channel is off until the next complete negotiated step. Returns the
        number of buckets (collectives) the step had."""
        for work in offer.works:
            wait_interruptibly(work, self.interrupted, "a gradient allreduce", self.stall,
                               "hvd.join() (a zero gradient step)", check=False)
        self.disarm()
        return len(offer.works)


__all__ = ["DTYPES", "GradientChannel", "JoinOffer"]
