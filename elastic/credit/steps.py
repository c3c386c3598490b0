"""Credit for synchronous steps: every member's samples of a step, recorded for a report."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elastic.core.engine import Kind, Request

if TYPE_CHECKING:
    from elastic.core.runtime import GenerationRuntime


def report_synchronous_step(runtime: GenerationRuntime, samples: int | None) -> None:
    """Record one synchronous step of the global set for the coordinator, when there is one.

    The allreduce that just completed is itself the proof that every member took part.
    With `samples=None` (the default, and what every Horovod script passes) each member
    counts one sample per step and nothing more is exchanged; with explicit counts, one
    allgather shares them (pass `samples` on every rank or on none).
    """
    sink = runtime.reports
    if sink is None:
        return
    members = runtime.members
    if samples is None:
        counts = [1] * len(members)
    else:
        (gathered,) = runtime.engine.submit(Request(
            Kind.ALLGATHER, [torch.tensor([int(samples)])], name="horde.samples")).result()
        counts = gathered.tolist()
    sink.record_step(runtime.generation.id, members, counts)
