"""The round reports that members send the coordinator (the JSON of docs/coordinator.md).

Pure functions of what every member saw in a round, so that every member reports the
same thing: a staleness round's contribution headers (`report_from_round`), a span of
synchronous steps (`report_synchronous`, coalesced by `StepWindow`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from elastic.settings import DEFAULT_REPORT_SPAN
from elastic.staleness.decide import Refusal

if TYPE_CHECKING:
    from elastic.staleness.rounds import RoundResult

_REPORTED = {Refusal.STALE: "stale", Refusal.NONFINITE: "nonfinite", Refusal.OUTLIER: "outlier"}


class StepWindow:
    """Coalesces the reports of synchronous steps into spans of `span` consecutive steps.

    Steps are numbered from 0 in each generation; span k covers steps k*span to
    (k+1)*span - 1 and is reported once this member has completed the step after it. That
    step's allreduce had every member's gradient, so every member had completed the whole
    span and reports the same one. Steps not yet reported when a generation ends (or at
    shutdown) go one by one: members may have finished different numbers of them.
    """

    def __init__(self, span: int = DEFAULT_REPORT_SPAN) -> None:
        if span < 1:
            raise ValueError(f"report span {span} must be a positive number of steps")
        self.span = span
        self._key: tuple[str, int, tuple[str, ...]] | None = None
        self._first = 0
        self._counts: list[list[int]] = []

    def add(self, job: str, generation: int, members: list[str], counts: list[int]
            ) -> list[dict[str, Any]]:
        """Record one completed step; returns the reports that are now due."""
        key = (job, generation, tuple(members))
        due: list[dict[str, Any]] = []
        if key != self._key:
            due = self.flush()
            self._key, self._first = key, 0
        self._counts.append(list(counts))
        while len(self._counts) > self.span or (self.span == 1 and self._counts):
            window, self._counts = self._counts[:self.span], self._counts[self.span:]
            due.append(report_synchronous(job, generation, self._first, members,
                                          [sum(c) for c in zip(*window)], span=len(window)))
            self._first += len(window)
        return due

    def flush(self) -> list[dict[str, Any]]:
        """The steps not yet reported, one report each (the generation ended)."""
        if self._key is None:
            return []
        job, generation, members = self._key
        due = [report_synchronous(job, generation, self._first + i, list(members), counts)
               for i, counts in enumerate(self._counts)]
        self._first += len(self._counts)
        self._counts = []
        return due


def report_from_round(job: str, members: list[str], result: RoundResult) -> dict[str, Any]:
    """The report of one staleness round: one header per member, identical on every member."""
    by_node: dict[str, list] = {}
    for c in result.contributions:
        by_node.setdefault(c.node, []).append(c)
    version = result.version - (1 if result.aggregate is not None else 0)
    contributions = []
    for node in members:
        items = by_node.get(node, [])
        accepted = [c for c in items if c.accepted]
        header: dict[str, Any] = {"node_id": node}
        if accepted:
            header.update(samples=sum(c.samples for c in accepted),
                          staleness=max(c.staleness for c in accepted),
                          param_version=min(c.version for c in accepted), accepted=True)
        elif items:
            worst = items[0]
            header.update(samples=sum(c.samples for c in items), staleness=worst.staleness,
                          param_version=worst.version, accepted=False,
                          reason=reported_reason(worst.refusal))
        else:
            header.update(samples=0, staleness=0, param_version=version, accepted=False,
                          reason="absent")
        contributions.append(header)
    return {"job": job, "generation": result.generation, "round": result.round,
            "members": members, "contributions": contributions, "timestamp": time.time()}


def report_synchronous(job: str, generation: int, round_: int, members: list[str],
                       samples: list[int], span: int = 1) -> dict[str, Any]:
    """The report of `span` synchronous steps from step `round_`: every member's samples
    (summed over the span) entered the aggregates."""
    report = {"job": job, "generation": generation, "round": round_, "members": members,
              "contributions": [{"node_id": node, "samples": int(n), "staleness": 0,
                                 "param_version": round_, "accepted": True}
                                for node, n in zip(members, samples)],
              "timestamp": time.time()}
    if span != 1:
        report["span"] = span
    return report


def reported_reason(refusal: Refusal | None) -> str:
    """The coordinator's reason for a refused contribution (docs/coordinator.md): its own
    code for a drop or a strike the coordinator counts, "other" for the rest."""
    if refusal in _REPORTED:
        return _REPORTED[refusal]
    return "other"
