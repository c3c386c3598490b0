"""One generation's runtime: what the layers below a frontend are given, as one object.

A `GenerationRuntime` is built when this process has connected a generation and is
never changed afterwards: the next generation (a reset, a re-init after `shutdown()`)
builds a new one. The engine, the gradient channel, staleness rounds and the credit
reports are handed the runtime they run in; none of them looks up process-wide state.
Holding an old runtime is safe: its `interrupted` signal is set once the generation ends,
and its engine then fails every request with HorovodInternalError.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elastic.core.engine import CollectiveEngine
    from elastic.core.transport import Transport
    from elastic.credit.reporter import CreditReporter
    from elastic.settings import WorkerSettings
    from rendezvous.generation import Generation


@dataclass(frozen=True)
class Topology:
    """Rank layout of this worker in its current generation."""

    generation: int
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int


@dataclass(frozen=True, eq=False)
class GenerationRuntime:
    """The generation this process is connected to, and everything it runs collectives with.

    `interrupted` is set when the generation can no longer be used (a member left or
    died, a reset was requested, the job failed): every wait on its transport gives up.
    `blacklist(node, reason)` asks the rendezvous to evict a node (None without one);
    `reports` takes the rounds' credit reports (None without a coordinator).
    """

    generation: Generation
    topology: Topology
    transport: Transport
    engine: CollectiveEngine
    interrupted: threading.Event
    node_id: str
    job: str
    settings: WorkerSettings
    blacklist: Callable[[str, str], None] | None = field(default=None, repr=False)
    reports: CreditReporter | None = field(default=None, repr=False)
    _next_stream: list[int] = field(default_factory=lambda: [0], repr=False)

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def size(self) -> int:
        return self.topology.size

    @property
    def members(self) -> list[str]:
        """Node ids by rank."""
        return list(self.generation.node_ids)

    def rounds_stream(self, stream: int | None = None) -> int:
        """Number a new stream of staleness rounds in this generation: `stream`, or the one
        after the last; every member starts its streams in the same order, so they agree
        (each stream has a process group of its own)."""
        if stream is None:
            stream = self._next_stream[0]
        self._next_stream[0] = stream + 1
        return stream

    def is_interrupted(self) -> bool:
        """True once this generation has ended for this process."""
        return self.interrupted.is_set()


__all__ = ["GenerationRuntime", "Topology"]
