"""Bounded-staleness steps of an optimizer: submit each step's gradient, apply the rounds.

Framework-neutral: a frontend gives its gradients as a `GradientLayout` (one flat torch
CPU buffer) and its optimizer as a `Stepper`; the rounds run in the runtime of the
generation the frontend passes at each step (a new generation starts new rounds).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from elastic.codecs.exchange import GradientLayout
from elastic.codecs.payload import PayloadCodec
from elastic.codecs.stats import RoundStats
from elastic.codecs.topk import TopKCompressor
from elastic.credit.reports import report_from_round
from elastic.staleness.decide import NormCheck, inverse_staleness
from elastic.staleness.rounds import RoundResult, StalenessRounds

if TYPE_CHECKING:
    from elastic.core.runtime import GenerationRuntime

__all__ = ["StaleExchange", "Stepper"]


class Stepper(Protocol):
    """A frontend's optimizer as the rounds step it, once per aggregate."""

    def momentum(self) -> bool:
        """Whether it keeps momentum (SGD's `momentum`, Adam's first beta)."""

    def adaptive(self) -> bool:
        """Whether it normalises a gradient's scale away (Adam and kin)."""

    def lrs(self) -> list[float] | None:
        """Its learning rates now, one per param group (None when it has none)."""

    def step(self, lr_factor: float = 1.0, lrs: list[float] | None = None) -> None:
        """One step on the gradients in place, with learning rates `lrs` (the round's,
        agreed by every member; None: its own) times `lr_factor`; its own rates are
        restored afterwards."""


class StaleExchange:
    """Bounded-staleness steps: submit this step's gradient, apply finished rounds in order."""

    def __init__(self, layout: GradientLayout, compressor: TopKCompressor | None,
                 staleness: int, round_deadline: float | None,
                 weight: Callable[[int], float] | None,
                 on_round: Callable[[RoundResult], None] | None = None,
                 fp16_dense: bool = False, norm_check: NormCheck | None = None) -> None:
        self.layout = layout
        self.compressor = compressor
        self.staleness = staleness
        self.round_deadline = round_deadline
        self.weight = weight or inverse_staleness
        self.on_round = on_round
        self.norm_check = norm_check
        self.fp16_dense = fp16_dense  # Compression.fp16: dense values travel as float16
        self.rounds: StalenessRounds | None = None
        self._flat: torch.Tensor | None = None
        self.applied = 0
        self.totals = RoundStats()  # of the generations before the current rounds
        self._strikes: Counter = Counter()  # per node, over all generations
        self.on_start: Callable[[], None] | None = None  # called when new rounds start

    def _ensure_rounds(self, runtime: GenerationRuntime) -> StalenessRounds:
        generation = runtime.generation.id
        if self.rounds is not None and self.rounds.generation == generation:
            return self.rounds
        if self.rounds is not None:
            self.rounds.close()
            self.totals = self.totals.plus(self.rounds.stats)
            self.rounds = None  # counted once, even if the next rounds fail to connect
        codec = PayloadCodec(self.layout, self.compressor, runtime.size,
                             fp16_dense=self.fp16_dense)
        on_round = self.on_round or _round_reporter(runtime)
        self.rounds = StalenessRounds(
            self.layout.numel, self.staleness, codec=codec, round_deadline=self.round_deadline,
            weight=self.weight, dtype=self.layout.dtype, on_round=on_round,
            on_strikes=_evictor(runtime), strikes=self._strikes, norm_check=self.norm_check,
            runtime=runtime)
        self.applied = 0
        if self.on_start is not None:
            self.on_start()
        return self.rounds

    def step(self, runtime: GenerationRuntime, samples: int, optimizer: Stepper) -> None:
        """Submit the current gradients to the rounds of `runtime`'s generation; step
        `optimizer` once per finished aggregate."""
        rounds = self._ensure_rounds(runtime)
        lrs = optimizer.lrs()
        if rounds.codec.encodes_each:  # encoded in submit(): one buffer serves every step
            self._flat = self.layout.gather(self._flat)
            rounds.submit(self._flat, samples, self.applied, copy=False, lrs=lrs)
        else:
            rounds.submit(self.layout.gather(), samples, self.applied, copy=False, lrs=lrs)
        self._apply(rounds.results(block=False), optimizer)
        while rounds.outstanding > self.staleness:
            self._apply(rounds.results(block=True, timeout=1.0), optimizer)
        rounds.released()

    def _apply(self, results: list[RoundResult], optimizer: Stepper) -> None:
        damped = self._damped(optimizer)
        adaptive = optimizer.adaptive()
        for result in results:
            self._settle(result, damped)
            if result.aggregate is not None:
                # One step per member step the aggregate stands for (a round that caught
                # two gradients of each member takes two steps' length), and with the
                # optimizer's momentum a staleness-aware step: a round of gradients s
                # aggregates old steps w(s) as far as a fresh one (the aggregate is their
                # average).
                factor = result.steps * (result.freshness if damped else 1.0)
                if adaptive:  # Adam and kin ignore a gradient's scale: scale the step
                    self.layout.scatter(result.aggregate)
                    optimizer.step(factor, result.lrs)
                else:  # SGD: scale what enters the momentum buffer and the step
                    self.layout.scatter(result.aggregate, factor)
                    optimizer.step(1.0, result.lrs)
                self.applied += 1
                if self.on_round is None and self.rounds is not None:  # nobody else holds it
                    self.rounds.recycle(result.aggregate)

    @staticmethod
    def _damped(optimizer: Stepper) -> bool:
        """Whether stale aggregates take a shorter step: with the optimizer's momentum
        (SGD's `momentum`, Adam's first beta). A gradient one aggregate old shrinks the
        steps for which heavy-ball momentum m is stable from 2(1+m)/h to (1-m)/h on a
        curvature h (0.1/h against 3.8/h for m=0.9), but only from 2/h to 1/h without
        momentum, where a shorter step would only slow training down. The compressor's
        momentum (top-k's momentum correction) is damped where gradients enter it
        instead (`PayloadCodec.intake`): full steps, stale gradients repeated less."""
        return optimizer.momentum()

    def _settle(self, result: RoundResult, damped: bool) -> None:
        """Tell the codec what became of this member's own contributions in the round."""
        rounds = self.rounds
        if rounds is None or not isinstance(rounds.codec, PayloadCodec) \
                or rounds.codec.compressor is None:
            return
        for c in result.contributions:
            if c.rank != rounds.rank:
                continue
            if c.accepted:
                applied = c.weight if damped else 1.0
                rounds.codec.intake = c.weight  # w(s) of an accepted one
            elif c.staleness > self.staleness:
                applied = 0.0  # dropped unapplied: all of it goes back
            else:
                # Rejected or skipped (`Refusal.UNSETTLED`): never fed back, and the residual
                # is forgotten: what top-k left of the same gradient would come again in
                # the next rounds, and if it was this member's own bad gradient, a round of
                # two members would not settle until it had trickled out.
                rounds.codec.settle(1.0)
                rounds.codec.compressor.reset()
                continue
            rounds.codec.settle(applied)

    def finish(self, optimizer: Stepper) -> None:
        """End the rounds on every member together and apply what is left."""
        if self.rounds is not None:
            self._apply(self.rounds.finish(), optimizer)
            self.totals = self.totals.plus(self.rounds.stats)
            self.rounds = None

    @property
    def stats(self) -> RoundStats:
        """Counts over every generation this optimizer ran in."""
        return self.totals.plus(self.rounds.stats) if self.rounds is not None else self.totals


def _round_reporter(runtime: GenerationRuntime) -> Callable[[RoundResult], None] | None:
    """Report every staleness round to the coordinator, when there is one."""
    sink = runtime.reports
    if sink is None:
        return None
    members, job = runtime.members, runtime.job
    return lambda result: sink.record(report_from_round(job, members, result))


def _evictor(runtime: GenerationRuntime) -> Callable[[str, str], None] | None:
    """Blacklist a node whose contributions were rejected too often (the worker acts on
    rank 0, or rank 1 for rank 0's own node: a node never evicts itself)."""
    blacklist = runtime.blacklist
    if blacklist is None:
        return None
    return lambda node, reason: blacklist(
        node, f"too many rejected contributions (last: {reason})")
