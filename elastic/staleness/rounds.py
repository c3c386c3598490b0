"""Bounded-staleness rounds: gradients are aggregated in rounds that never wait long.

A `StalenessRounds` runs a communication thread on a process group of its own. Each
round, every member contributes what it has: the gradients it finished since its last
round, or nothing if none finished within the round deadline. The contributions travel
in one allgather with their headers (`elastic.staleness.wire`); every member takes the
payloads' norms itself and decides identically (`elastic.staleness.decide`):
contributions staler than `staleness` rounds are dropped, non-finite or outlying ones
are rejected (a strike for their node), the others are weighted (default
`1/(1+staleness)`) and averaged by weighted sample count. Members apply the same
aggregates in the same order, so parameters stay bit-identical.
"""

from __future__ import annotations

import logging
import math
import queue
import statistics
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from elastic.codecs.base import Codec, DenseCodec
from elastic.codecs.robust import MultiKrum
from elastic.codecs.stats import RoundStats
from elastic.core.engine import CollectiveEngine, Kind, Request
from elastic.errors import HorovodInternalError, NonFiniteGradientError
from elastic.staleness.decide import (
    Add,
    Contribution,
    Entry,
    NormCheck,
    Refusal,
    decide_round,
    inverse_staleness,
)
from elastic.staleness.wire import checked, pack, unpack

if TYPE_CHECKING:
    from elastic.core.runtime import GenerationRuntime

logger = logging.getLogger(__name__)

__all__ = ["ROUNDS_SET_ID", "RoundResult", "StalenessRounds"]

#: Process-set id reserved for the rounds' own process group.
ROUNDS_SET_ID = 1 << 20


@dataclass
class RoundResult:
    """The outcome of a round, identical on every member."""

    generation: int
    round: int
    version: int
    aggregate: torch.Tensor | None
    contributions: list[Contribution]
    freshness: float = 1.0
    """sum w(s) n / sum n over the accepted contributions: the step size that suits this
    aggregate relative to one of fresh gradients (the optimizer scales its step by it;
    the aggregate itself is normalised by the weighted count, so it is an average)."""
    lrs: list[float] | None = None
    """The learning rates (one per param group) to apply this aggregate with, the same on
    every member: per group the least that the members sent in their headers (None when
    none sent any). A schedule stepped per local step gives members different rates at
    the moment each applies an aggregate; applying with its own would part them."""
    steps: float = 1.0
    """Accepted contributions per member that contributed: how many steps of its members
    the aggregate stands for. A round that catches two gradients of every member (their
    compute outpaced the rounds) averages them into one aggregate; applied as one plain
    step it makes half the progress per sample of a round of one each, so the optimizer
    scales its step by this."""


@dataclass
class _Pending:
    flat: torch.Tensor | None  # the gradient, or None once encoded into `message`
    samples: int
    version: int
    step_time: float
    message: torch.Tensor | None = None


class StalenessRounds:
    """Rounds of one flat gradient buffer with bounded staleness.

    `submit()` hands over a gradient computed on parameter version `version` (the
    number of aggregates applied so far) and returns at once unless `staleness`
    contributions are already outstanding; `results()` returns finished rounds in order.
    """

    def __init__(
        self,
        numel: int,
        staleness: int,
        codec: Codec | None = None,
        round_deadline: float | None = None,
        weight: Callable[[int], float] = inverse_staleness,
        norm_check: NormCheck | None = None,
        dtype: torch.dtype = torch.float32,
        on_round: Callable[[RoundResult], None] | None = None,
        on_strikes: Callable[[str, str], None] | None = None,
        strikes: Counter | None = None,
        stream: int | None = None,
        runtime: GenerationRuntime | None = None,
    ) -> None:
        """`strikes`: a count per node to go on from (an earlier generation's), so that
        membership changes do not wipe a node's record. `stream`: which stream of rounds
        of this generation this is, default the next (streams one after another, each
        finished before the next, as every member does alike: a process group each).
        `runtime`: the generation to run in (`hvd.StalenessRounds` passes the current one)."""
        if staleness < 0:
            raise ValueError(f"staleness={staleness} must be >= 0")
        if round_deadline is not None and round_deadline < 0:
            raise ValueError(f"round_deadline={round_deadline} must be >= 0 seconds")
        if runtime is None:
            raise TypeError("StalenessRounds needs the runtime of the generation it runs in "
                            "(hvd.StalenessRounds passes the current one)")
        self.numel = numel
        self.staleness = staleness
        self.codec = codec or DenseCodec()
        self.round_deadline = round_deadline
        self.weight = weight
        self.norm_check = norm_check or NormCheck()
        self.dtype = dtype
        self.stats = RoundStats(residual=self.codec.residual_norm,
                                strikes=strikes if strikes is not None else Counter())
        self.on_round = on_round
        self.on_strikes = on_strikes
        self.generation = runtime.generation.id
        self.node_id = runtime.node_id
        self._members = runtime.members
        self._peers_finishing = False
        self.rank = runtime.rank
        self.size = runtime.size
        self._interrupted = runtime.interrupted
        stream = runtime.rounds_stream(stream)
        transport = runtime.transport.subset(list(range(self.size)), ROUNDS_SET_ID + stream,
                                              self._interrupted)
        assert transport is not None  # every rank is in the set
        self._engine = CollectiveEngine(transport, self._interrupted,
                                        max_part_bytes=runtime.settings.max_allgather_bytes)
        self._outbox: deque[_Pending] = deque()
        self._outbox_ready = threading.Condition()
        self._results: queue.Queue[RoundResult | BaseException] = queue.Queue()
        self._outstanding = 0
        self._round = 0
        self._version = 0
        self._encoded = 0  # gradients encoded at submit (`Codec.encodes_each`)
        self._spares: list[torch.Tensor] = []  # recycled aggregate buffers
        self._step_times: deque[float] = deque(maxlen=16)
        self._released: float | None = None  # when the training thread last went on
        self._delivered: float | None = None  # when the last round's result was queued
        self._round_started: float | None = None  # when this member entered its last round
        self._own_times: deque[float] = deque(maxlen=16)  # this member's compute times
        self._lrs: list[float] | None = None  # this member's learning rates, last submitted
        # The norm check's memory, per stream: every member of the generation starts it
        # together, so every member judges with the same history (a newcomer would not
        # have an earlier generation's).
        self._recent_norms: deque[float] = deque(maxlen=self.norm_check.history)
        self._own_norms: dict[str, deque[float]] = {}
        self._max_nonfinite = runtime.settings.max_nonfinite_steps
        # Multi-Krum (HORDE_ROBUST_AGGREGATION=F): its suspicions per stream, like the norms.
        self._robust = MultiKrum(runtime.settings.robust_aggregation)
        self._nonfinite_run = 0  # consecutive rounds whose aggregate was non-finite
        self._evicting: set[str] = set()  # nodes already handed to `on_strikes`
        self._closed = False
        self._finishing = False
        self._all_finished = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="horde-rounds", daemon=True)
        self._thread.start()

    # -- training thread --------------------------------------------------------------

    def submit(self, flat: torch.Tensor, samples: int, version: int, copy: bool = True,
               lrs: Sequence[float] | None = None) -> None:
        """Queue a finished gradient for the next rounds: a copy of it, or with
        `copy=False` the tensor itself (the caller hands it over and does not touch it).
        A codec that `encodes_each` encodes it here, and `flat` is free on return.
        `lrs`: this member's learning rates now, sent with its next messages (see
        `RoundResult.lrs`)."""
        if lrs is not None:
            self._lrs = [float(lr) for lr in lrs]
        if self._error is not None:
            raise self._error
        if flat.numel() != self.numel:
            raise ValueError(f"submitted {flat.numel()} values; this round stream has {self.numel}")
        flat = flat.detach().to(self.dtype, copy=copy)
        item = _Pending(flat, int(samples), int(version), 0.0)
        if self.codec.encodes_each:
            item.message = self.codec.encode(flat, self._encoded)
            item.flat = None
            self.stats.last_density = self.codec.density(self._encoded)
            self._encoded += 1
        now = time.monotonic()
        # The step's own time: from release (previous `step()` returned) until its
        # gradient is ready to send, so time spent blocked on rounds does not count.
        item.step_time = now - self._released if self._released is not None else 0.0
        self._released = now
        if item.step_time > 0:
            self._own_times.append(item.step_time)
        with self._outbox_ready:
            self._outbox.append(item)
            self._outstanding += 1
            self._outbox_ready.notify_all()

    def released(self) -> None:
        """The training thread goes on computing now (after any wait for rounds)."""
        with self._outbox_ready:
            self._released = time.monotonic()
            self._outbox_ready.notify_all()

    @property
    def outstanding(self) -> int:
        """Contributions submitted whose round has not been returned by `results()` yet."""
        return self._outstanding

    def results(self, block: bool = False, timeout: float | None = None) -> list[RoundResult]:
        """Finished rounds in order; with `block`, wait for at least one."""
        out: list[RoundResult] = []
        while True:
            try:
                item = self._results.get(block=block and not out, timeout=timeout)
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                self._error = item
                raise item
            out.append(item)
            self._outstanding -= sum(1 for c in item.contributions if c.rank == self.rank)
        return out

    def finish(self, timeout: float = 60.0) -> list[RoundResult]:
        """Collectively end the rounds: keep going until every member has sent all it had
        and asked to finish, then stop at the same round everywhere. Returns the rounds
        not yet returned by `results()`."""
        with self._outbox_ready:
            self._finishing = True
            self._outbox_ready.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise HorovodInternalError(f"rounds did not finish within {timeout:g} s")
        rest = self.results(block=False)
        self._engine.close()
        return rest

    def close(self) -> None:
        """Abandon the rounds at once (on a reset); not collective."""
        self._closed = True
        with self._outbox_ready:
            self._outbox_ready.notify_all()
        self._thread.join(timeout=5)
        self._engine.close()

    # -- communication thread ---------------------------------------------------------

    def _deadline(self) -> float:
        """How long a member waits for its own gradient before entering a round empty.

        Default: the median compute time per step the members reported recently, so
        balanced members meet with one step each, and a straggler delays a round by at
        most about one step of the others. Counted from when this member entered its
        last round (not from when it ended), so a member with nothing to send enters the
        next round about when the others have their next gradient: rounds follow the
        fast members' pace instead of adding the deadline to each round's own time.
        """
        if self.round_deadline is not None:
            return self.round_deadline
        if not self._step_times:
            return 0.5
        return max(0.005, statistics.median(self._step_times))

    def _take(self) -> list[_Pending]:
        """Everything finished so far; waits up to the deadline for the first one.

        A member at the group's pace (its own median compute time at most 1.25x the
        deadline) also waits until half a step after its gradient is due, so that jitter
        does not push that gradient into a later round, where it could arrive too stale
        and be dropped; a member much slower than the group never holds a round for it.
        """
        start = self._round_started if self._round_started is not None else time.monotonic()
        pace = self._deadline()
        with self._outbox_ready:
            while not self._outbox and not self._closed and not self._finishing:
                remaining = self._own_deadline(start, pace) - time.monotonic()
                if remaining <= 0 or self._interrupted.is_set():
                    break
                self._outbox_ready.wait(remaining)
            taken = list(self._outbox)
            self._outbox.clear()
            return taken

    def _own_deadline(self, start: float, pace: float) -> float:
        deadline = start + pace
        released = self._released  # re-read: `released()` wakes the wait
        if released is not None and self._delivered is not None:
            # A training thread still blocked on the round just delivered goes on now.
            released = max(released, self._delivered)
        if self.round_deadline is None and self._own_times and released is not None:
            own = statistics.median(self._own_times)
            if own <= 1.25 * pace:
                deadline = max(deadline, released + 1.5 * own)
        return deadline

    def _loop(self) -> None:
        try:
            while not self._closed and not self._all_finished:
                pending = self._take()
                if self._closed:
                    return
                if self._interrupted.is_set():
                    raise HorovodInternalError("the generation ended during a round")
                self._results.put(self._run_round(pending))
                self._delivered = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._results.put(exc if isinstance(exc, (HorovodInternalError,
                                                      NonFiniteGradientError))
                              else HorovodInternalError(f"round failed: {exc}"))

    def _combine(self, pending: list[_Pending]) -> torch.Tensor | None:
        """This member's finished gradients, weighted as every member will weigh them
        (the pending tensors are consumed: one usable gradient is sent as it is)."""
        usable = [(item.flat, self.weight(self._version - item.version) * item.samples)
                  for item in pending if self._fresh(item) and item.flat is not None]
        if len(usable) == 1:
            return usable[0][0]
        combined: torch.Tensor | None = None
        mass = 0.0
        for flat, w in usable:
            combined = flat.mul_(w) if combined is None else combined.add_(flat, alpha=w)
            mass += w
        if combined is not None and mass > 0:
            combined.div_(mass)
        return combined

    def _fresh(self, item: _Pending) -> bool:
        """Whether a pending gradient is still within the bound (every member decides
        the same from the header, so a staler one is not sent at all)."""
        return self._version - item.version <= self.staleness

    def _payload(self, pending: list[_Pending], header: dict[str, object]) -> torch.Tensor:
        """This member's payload for the round (empty when it has nothing to send), and
        the header's parts for a codec that encodes each gradient. No norm travels: every
        member computes each payload's norm itself (a sender's word is not trusted)."""
        empty = torch.empty(0, dtype=torch.uint8)
        dense_bytes = self.numel * self.dtype.itemsize * (self.size - 1)
        if self.codec.encodes_each:
            sent = [item.message if self._fresh(item) else None for item in pending]
            if all(message is None for message in sent):
                return empty
            header["parts"] = [0 if m is None else int(m.numel()) for m in sent]
            self.stats.dense_bytes += dense_bytes
            return torch.cat([m for m in sent if m is not None])
        combined = self._combine(pending)
        if combined is None:
            return empty
        self.stats.last_density = self.codec.density(self._round)
        self.stats.dense_bytes += dense_bytes
        return self.codec.encode(combined, self._round)

    def _run_round(self, pending: list[_Pending]) -> RoundResult:
        t = self._round
        self._round_started = time.monotonic()
        with self._outbox_ready:
            finishing = self._finishing and not self._outbox and not pending
        contribs = [[p.samples, p.version] for p in pending]
        step_time = statistics.median([p.step_time for p in pending]) if pending else 0.0
        header: dict[str, object] = {"node": self.node_id, "rank": self.rank, "round": t,
                                     "codec": self.codec.tag, "finishing": finishing,
                                     "contribs": contribs, "step_time": step_time}
        if self._lrs is not None:
            header["lrs"] = self._lrs
        message = pack(header, self._payload(pending, header))
        self.stats.bytes_sent += int(message.numel()) * (self.size - 1)
        gathered = self._gather(message)
        result = self._aggregate(t, gathered)
        self._all_finished = self._peers_finishing
        self._round += 1
        self.stats.rounds += 1
        if self.on_round is not None:
            self.on_round(result)
        return result

    def _gather(self, message: torch.Tensor) -> list[torch.Tensor]:
        """Every member's message, in rank order, from one allgather (the engine's
        negotiation already exchanged the sizes)."""
        # An honest message: a header and the payloads of at most S + 1 pending gradients
        # (Horde's optimizers keep no more outstanding; sparse payloads carry 4-byte
        # indices next to values of up to 8 bytes). A peer announcing more than that, and
        # more than HORDE_MAX_ALLGATHER_BYTES, is refused before anything is allocated.
        honest = (self.staleness + 2) * (12 * self.numel + 4096) + (1 << 20)
        gather = Request(Kind.ALLGATHER, [message], honest_part_bytes=honest)
        data = self._engine.submit(gather).result()[0]
        parts, offset = [], 0
        for count in gather.splits:
            parts.append(data[offset:offset + count])
            offset += count
        return parts

    def _aggregate(self, t: int, gathered: list[torch.Tensor]) -> RoundResult:
        """Read every member's message, decide (`decide_round`, identically on every
        member) and add what was accepted, in rank order, into one buffer."""
        entries: list[Entry] = []
        payloads: list[tuple[torch.Tensor, list[torch.Tensor | None] | None]] = []
        finishing = True
        for rank, message in enumerate(gathered):
            entry, payload, parts, done = self._read(t, rank, message)
            entries.append(entry)
            payloads.append((payload, parts))
            finishing = finishing and done
            if entry.step_time:
                self._step_times.append(entry.step_time)
        self._peers_finishing = finishing
        decision = decide_round(entries, self._members, self._version, self.staleness,
                                self.norm_check, self._recent_norms, self.weight,
                                self._own_norms)
        self._recent_norms.extend(decision.accepted_norms)
        for node, norm in decision.node_norms.items():
            self._own_norms.setdefault(node, deque(maxlen=self.norm_check.history)).append(norm)
        self.stats.accepted += decision.accepted
        self.stats.dropped_stale += decision.dropped_stale
        self.stats.staleness.update(decision.staleness)
        self.stats.rejected += len(decision.rejected)
        self.stats.unsettled += sum(1 for code in decision.rejected.values()
                                    if code is Refusal.UNSETTLED)
        for rank in decision.strikes:
            self._strike(self._members[rank], decision.reasons[rank])
        for rank, code in sorted(decision.rejected.items()):
            if code is Refusal.UNSETTLED or rank not in decision.strikes:
                logger.warning("round %d: skipped the contribution of %s without a strike (%s)",
                               t, self._members[rank], decision.reasons[rank])
        total = decision.total
        aggregate = None
        if total > 0:
            # Every accepted payload has a finite norm, so finite values (each below
            # ~1.8e19: a larger one squares to Inf), and the aggregate is their convex
            # combination: finite too, with no pass over it to check.
            aggregate = self._buffer()
            if self._robust.f > 0:  # small rounds: only ranks already known as suspect out
                self._robust_add(decision.adds, payloads, aggregate)
            else:
                for add in decision.adds:  # normalised as added: no pass over the sum after
                    self.codec.decode_add(self._data(add, payloads), aggregate,
                                          add.mass / total)
            self._version += 1
        else:
            self.stats.empty_rounds += 1
        self._count_nonfinite(t, decision.nonfinite, aggregate is not None)
        return RoundResult(self.generation, t, self._version, aggregate,
                           decision.contributions, decision.freshness, decision.lrs,
                           decision.steps)

    @staticmethod
    def _data(add: Add, payloads: list[tuple[torch.Tensor, list[torch.Tensor | None] | None]]
              ) -> torch.Tensor:
        """The bytes of one accepted contribution (a part, for a codec that encodes each)."""
        payload, parts = payloads[add.rank]
        data = payload if add.part is None or parts is None else parts[add.part]
        assert data is not None  # decide_round adds only parts that came with bytes
        return data

    def _robust_add(self, adds: list[Add],
                    payloads: list[tuple[torch.Tensor, list[torch.Tensor | None] | None]],
                    out: torch.Tensor) -> None:
        """Multi-Krum over members (`elastic.codecs.robust`): each member's accepted parts
        as one gradient (weighted as the round weighs them), the F furthest from the
        others left out, the rest averaged by their weight into `out`. Per member, not per
        part, so a member cannot outvote others by splitting its gradient."""
        masses: dict[int, float] = {}
        for add in adds:
            masses[add.rank] = masses.get(add.rank, 0.0) + add.mass
        ranks = sorted(masses)
        own = {rank: torch.zeros(self.numel, dtype=self.dtype) for rank in ranks}
        for add in adds:
            self.codec.decode_add(self._data(add, payloads), own[add.rank],
                                  add.mass / masses[add.rank])
        kept = [ranks[i] for i in self._robust.keep([own[rank] for rank in ranks], ranks)]
        total = sum(masses[rank] for rank in kept)
        for rank in kept:  # rank order: the same sum on every member
            out.add_(own[rank], alpha=masses[rank] / total)
        dropped = [rank for rank in ranks if rank not in kept]
        self.stats.robust_dropped += len(dropped)
        self.stats.robust_dropped_ranks.update(dropped)

    def _count_nonfinite(self, t: int, nonfinite: bool, applied: bool) -> None:
        """Stop every member together after `HORDE_MAX_NONFINITE_STEPS` consecutive rounds
        whose gradients were all non-finite (the shared model went bad, or the data did)."""
        if applied:
            self._nonfinite_run = 0
        elif nonfinite:
            self._nonfinite_run += 1
            self.stats.nonfinite_rounds += 1
        if self._max_nonfinite and self._nonfinite_run >= self._max_nonfinite:
            raise NonFiniteGradientError(
                f"round {t} of generation {self.generation}: every gradient of the last "
                f"{self._nonfinite_run} rounds that had any was non-finite (NaN/Inf), so "
                "none was applied; the model or the data went bad on every member. Check "
                "the learning rate and the inputs, or resume from a checkpoint "
                f"(HORDE_MAX_NONFINITE_STEPS={self._max_nonfinite} sets how many such "
                "rounds are skipped before the job stops)")

    def _read(self, t: int, rank: int, message: torch.Tensor
              ) -> tuple[Entry, torch.Tensor, list[torch.Tensor | None] | None, bool]:
        """One member's message as an `Entry` (its header checked, its payload's norms
        taken here: a sender's word is not trusted), with its payload, its parts, and
        whether it asked to finish."""
        empty = torch.empty(0, dtype=torch.uint8)
        try:
            header, payload = checked(*unpack(message))
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            # A peer's garbage costs it a strike; it must not end the generation.
            logger.warning("round %d: malformed message from rank %d: %s", t, rank, exc)
            return Entry(nbytes=int(message.numel()), malformed=str(exc)), empty, None, False
        contribs = tuple((int(n), int(v)) for n, v in header.get("contribs", []))
        step_time = float(header.get("step_time", 0.0))
        norm: float | None = None
        part_norms: tuple[float | None, ...] | None = None
        parts: list[torch.Tensor | None] | None = None
        if payload.numel():
            try:
                if header.get("parts") is None:
                    norm = self.codec.norm(payload, self.numel)
                else:
                    parts, norms, offset = [], [], 0
                    for size in header["parts"]:
                        data = payload[offset:offset + size]
                        offset += size
                        parts.append(data if size else None)
                        norms.append(self.codec.norm(data, self.numel) if size else None)
                    part_norms = tuple(norms)
            except (ValueError, RuntimeError) as exc:
                norm, part_norms, parts = math.nan, None, None
                logger.warning("round %d: undecodable contribution from rank %d: %s", t, rank,
                               exc)
        lrs = header.get("lrs")
        entry = Entry(contribs, norm, part_norms, step_time, int(message.numel()),
                      lrs=tuple(float(x) for x in lrs) if lrs is not None else None)
        return entry, payload, parts, bool(header.get("finishing"))

    def _buffer(self) -> torch.Tensor:
        """A zeroed buffer for an aggregate: a recycled one when there is one."""
        with self._outbox_ready:
            spare = self._spares.pop() if self._spares else None
        if spare is None:
            return torch.zeros(self.numel, dtype=self.dtype)
        return spare.zero_()

    def recycle(self, aggregate: torch.Tensor) -> None:
        """Give back an aggregate the caller is done with (applied, no reference kept):
        a later round reuses its memory instead of allocating and faulting in a new one."""
        if aggregate.numel() == self.numel and aggregate.dtype == self.dtype \
                and aggregate.device.type == "cpu":
            with self._outbox_ready:
                if len(self._spares) < 2:
                    self._spares.append(aggregate)

    def codec_for(self, header: dict) -> Codec:
        if header.get("codec") != self.codec.tag:
            raise ValueError(f"codec {header.get('codec')!r} differs from {self.codec.tag!r}")
        return self.codec

    def _strike(self, node: str, reason: str) -> None:
        """Count a strike against `node` (the same record on every member); at the limit,
        hand it to `on_strikes` once. A node never has itself evicted: when its own
        contribution is refused it says so and leaves eviction to its peers."""
        self.stats.strikes[node] += 1
        logger.warning("rejected a contribution of %s (%s); strike %d of %d", node, reason,
                       self.stats.strikes[node], self.norm_check.max_strikes)
        if self.stats.strikes[node] < self.norm_check.max_strikes or node in self._evicting \
                or node == self.node_id or self.on_strikes is None:
            return
        self._evicting.add(node)
        self.on_strikes(node, reason)
