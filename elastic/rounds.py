"""Bounded-staleness rounds: gradients are aggregated in rounds that never wait long.

A `StalenessRounds` runs a communication thread on a process group of its own. Each
round, every member contributes what it has: the gradients it finished since its last
round, or nothing if none finished within the round deadline. The contributions travel
in one allgather with their headers (node, samples, parameter version; each member
takes the payloads' norms itself), so every member sees, and decides identically:
contributions staler than `staleness` rounds are dropped, non-finite or outlying ones
are rejected (a strike for their node), the others are weighted (default
`1/(1+staleness)`) and averaged by weighted sample count. Members apply the same
aggregates in the same order, so parameters stay bit-identical.
"""

from __future__ import annotations

import json
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
from elastic.codecs.stats import RoundStats
from elastic.errors import HorovodInternalError

if TYPE_CHECKING:
    from elastic.core.runtime import GenerationRuntime

logger = logging.getLogger(__name__)

#: Process-set id reserved for the rounds' own process group.
ROUNDS_SET_ID = 1 << 20
_HEADER = struct.Struct("<I")
_streams: Counter = Counter()  # streams of rounds started per generation, in this process


def inverse_staleness(staleness: int) -> float:
    """Default weight of a contribution `staleness` aggregates old: 1/(1+staleness)."""
    return 1.0 / (1.0 + staleness)


@dataclass(frozen=True)
class Contribution:
    """What every member knows about one member's contribution to one round."""

    node: str
    rank: int
    samples: int
    version: int
    staleness: int
    weight: float
    norm: float
    step_time: float
    nbytes: int
    accepted: bool
    reason: str = ""


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
    steps: float = 1.0
    """Accepted contributions per member that contributed: how many steps of its members
    the aggregate stands for. A round that catches two gradients of every member (their
    compute outpaced the rounds) averages them into one aggregate; applied as one plain
    step it makes half the progress per sample of a round of one each, so the optimizer
    scales its step by this."""


@dataclass(frozen=True)
class NormCheck:
    """Rejects non-finite contributions and those whose norm exceeds `factor` x the median
    of this round's norms and the recently accepted ones (`history` of them are kept, so
    a round with few contributors is still checked)."""

    factor: float = 10.0
    min_contributions: int = 3
    max_strikes: int = 3
    history: int = 32

    def __post_init__(self) -> None:
        if self.factor <= 1 or self.min_contributions < 1 or self.max_strikes < 1 \
                or self.history < 0:
            raise ValueError(
                f"NormCheck needs factor > 1, min_contributions >= 1, max_strikes >= 1 and "
                f"history >= 0; got factor={self.factor}, min_contributions="
                f"{self.min_contributions}, max_strikes={self.max_strikes}, "
                f"history={self.history}")

    def judge(self, norms: dict[int, float], recent: Sequence[float] = ()) -> dict[int, str]:
        """Reasons for rejection keyed by rank (deterministic on every member, which all
        pass the same `recent` norms)."""
        bad = {r: "non-finite values" for r, n in norms.items() if not math.isfinite(n)}
        reference = [n for r, n in norms.items() if r not in bad] + list(recent)
        if len(reference) >= self.min_contributions:
            median = statistics.median(reference)
            for r, n in norms.items():
                if r not in bad and median > 0 and n > self.factor * median:
                    bad[r] = f"norm {n:.3g} exceeds {self.factor:g}x the recent median"
        return bad


@dataclass
class _Pending:
    flat: torch.Tensor | None  # the gradient, or None once encoded into `message`
    samples: int
    version: int
    step_time: float
    message: torch.Tensor | None = None


_ALIGN = 8


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def pack(header: dict, payload: torch.Tensor) -> torch.Tensor:
    """One member's message: a length-prefixed JSON header, then the payload bytes.

    Header and payload are padded to 8 bytes so that, concatenated by an allgather,
    every payload stays aligned for viewing as float/int32 without a copy.
    """
    header = {**header, "payload_bytes": int(payload.numel())}
    raw = json.dumps(header, separators=(",", ":")).encode()
    head_len = _padded(_HEADER.size + len(raw))
    message = torch.zeros(head_len + _padded(payload.numel()), dtype=torch.uint8)
    head = _HEADER.pack(len(raw)) + raw
    message[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    if payload.numel():
        message[head_len:head_len + payload.numel()] = payload
    return message


def unpack(message: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Inverse of `pack`; the payload is a view into `message`."""
    if message.numel() < _HEADER.size:
        raise ValueError(f"a message of {message.numel()} bytes has no header")
    (length,) = _HEADER.unpack(bytes(message[:_HEADER.size].tolist()))
    header = json.loads(bytes(message[_HEADER.size:_HEADER.size + length].tolist()))
    if not isinstance(header, dict):
        raise ValueError(f"the header is {type(header).__name__}, not an object")
    start = _padded(_HEADER.size + length)
    size = header.get("payload_bytes", 0)
    if type(size) is not int or not 0 <= size <= message.numel() - start:
        raise ValueError(f"payload_bytes {size!r} does not fit the {message.numel()}-byte message")
    return header, message[start:start + size]


def _checked(header: dict, payload: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """A peer's header with the fields the rounds read checked for type and range;
    ValueError names the first bad one."""
    contribs = header.get("contribs", [])
    if not isinstance(contribs, list) or not all(
            isinstance(c, list) and len(c) == 2 and all(type(x) is int for x in c)
            and c[0] >= 0 for c in contribs):
        raise ValueError("contribs must be a list of [samples >= 0, version] integer pairs")
    parts = header.get("parts")
    if parts is not None and (
            not isinstance(parts, list) or len(parts) != len(contribs)
            or not all(type(n) is int and n >= 0 for n in parts)
            or sum(parts) != payload.numel()):
        raise ValueError(f"parts must give the payload's {payload.numel()} bytes as one "
                         f"size >= 0 per contribution ({len(contribs)})")
    step_time = header.get("step_time", 0.0)
    if type(step_time) not in (int, float) or not 0.0 <= step_time < 1e6:
        raise ValueError(f"step_time {step_time!r} is not a duration in seconds")
    if not isinstance(header.get("finishing", False), bool):
        raise ValueError("finishing must be true or false")
    return header, payload


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
        `runtime`: the generation to run in (default: the current one)."""
        if staleness < 0:
            raise ValueError(f"staleness={staleness} must be >= 0")
        if round_deadline is not None and round_deadline < 0:
            raise ValueError(f"round_deadline={round_deadline} must be >= 0 seconds")
        from elastic.core.engine import CollectiveEngine

        if runtime is None:
            from elastic.core.session import runtime as current

            runtime = current()
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
        if stream is None:
            stream = _streams[self.generation]
        _streams[self.generation] = stream + 1
        transport = runtime.transport.subset(list(range(self.size)), ROUNDS_SET_ID + stream)
        assert transport is not None  # every rank is in the set
        self._engine = CollectiveEngine(transport, self._interrupted)
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
        self._recent_norms: deque[float] = deque(maxlen=self.norm_check.history)
        self._closed = False
        self._finishing = False
        self._all_finished = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="horde-rounds", daemon=True)
        self._thread.start()

    # -- training thread --------------------------------------------------------------

    def submit(self, flat: torch.Tensor, samples: int, version: int, copy: bool = True) -> None:
        """Queue a finished gradient for the next rounds: a copy of it, or with
        `copy=False` the tensor itself (the caller hands it over and does not touch it).
        A codec that `encodes_each` encodes it here, and `flat` is free on return."""
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
            self._results.put(exc if isinstance(exc, HorovodInternalError)
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
        from elastic.core.engine import Kind, Request

        t = self._round
        self._round_started = time.monotonic()
        with self._outbox_ready:
            finishing = self._finishing and not self._outbox and not pending
        contribs = [[p.samples, p.version] for p in pending]
        step_time = statistics.median([p.step_time for p in pending]) if pending else 0.0
        header: dict[str, object] = {"node": self.node_id, "rank": self.rank, "round": t,
                                     "codec": self.codec.tag, "finishing": finishing,
                                     "contribs": contribs, "step_time": step_time}
        message = pack(header, self._payload(pending, header))
        self.stats.bytes_sent += int(message.numel()) * (self.size - 1)
        gathered = self._gather(message, Kind, Request)
        result = self._aggregate(t, gathered)
        self._all_finished = self._peers_finishing
        self._round += 1
        self.stats.rounds += 1
        if self.on_round is not None:
            self.on_round(result)
        return result

    def _gather(self, message: torch.Tensor, kind: object, request: object) -> list[torch.Tensor]:
        """Every member's message, in rank order, from one allgather (the engine's
        negotiation already exchanged the sizes)."""
        gather = request(kind.ALLGATHER, [message])  # type: ignore[attr-defined,operator]
        data = self._engine.submit(gather).result()[0]
        parts, offset = [], 0
        for count in gather.splits:
            parts.append(data[offset:offset + count])
            offset += count
        return parts

    def _aggregate(self, t: int, gathered: list[torch.Tensor]) -> RoundResult:
        """Decide and add, identically on every member, in rank order, into one buffer."""
        version = self._version
        entries: list[tuple[dict, torch.Tensor]] = []
        malformed: dict[int, str] = {}
        for rank, message in enumerate(gathered):
            try:
                entries.append(_checked(*unpack(message)))
            except (ValueError, TypeError, KeyError, struct.error) as exc:
                # A peer's garbage costs it a strike; it must not end the generation.
                malformed[rank] = f"malformed message ({exc})"
                logger.warning("round %d: malformed message from rank %d: %s", t, rank, exc)
                entries.append(({}, torch.empty(0, dtype=torch.uint8)))
        self._peers_finishing = all(h.get("finishing") for h, _ in entries)
        norms: dict[int, float] = {rank: float("nan") for rank in malformed}
        # Messages in parts (`Codec.encodes_each`): per contribution, its bytes and norm.
        pieces: dict[int, list[tuple[torch.Tensor, float] | None]] = {}
        for rank, (header, payload) in enumerate(entries):
            if payload.numel() == 0:
                continue
            try:
                if header.get("parts") is None:
                    norms[rank] = self.codec.norm(payload, self.numel)
                    continue
                split = pieces[rank] = []
                offset = 0
                for size in header["parts"]:
                    data = payload[offset:offset + size]
                    offset += size
                    split.append((data, self.codec.norm(data, self.numel)) if size else None)
                # One bad part rejects the message, as a bad average would.
                part_norms = [piece[1] for piece in split if piece is not None]
                norms[rank] = (max(part_norms) if all(map(math.isfinite, part_norms))
                               else float("nan"))
            except (ValueError, RuntimeError) as exc:
                norms[rank] = float("nan")
                pieces.pop(rank, None)
                logger.warning("round %d: undecodable contribution from rank %d: %s", t, rank, exc)
        rejected = {**self.norm_check.judge(norms, self._recent_norms), **malformed}
        self._recent_norms.extend(n for r, n in sorted(norms.items()) if r not in rejected)
        contributions: list[Contribution] = []
        adds: list[tuple[torch.Tensor, float]] = []  # what to add, with its weighted samples
        plain = 0  # accepted samples, unweighted
        counted: Counter = Counter()  # accepted contributions with a payload, per rank
        for rank, (header, payload) in enumerate(entries):
            node = self._members[rank]  # by rank, never by what the header claims
            if header.get("step_time"):
                self._step_times.append(float(header["step_time"]))
            mass = 0.0
            split = pieces.get(rank)
            part_adds: list[tuple[torch.Tensor, float]] = []
            for i, (samples, v) in enumerate(header.get("contribs", [])):
                staleness = version - int(v)
                piece = split[i] if split is not None else None
                reason = ""
                if staleness > self.staleness:
                    reason = f"staleness {staleness} exceeds {self.staleness}"
                    self.stats.dropped_stale += 1
                elif rank in rejected:
                    reason = rejected[rank]
                elif rank not in norms or (split is not None and piece is None):
                    reason = "no payload"
                weight = 0.0 if reason else self.weight(staleness)
                if not reason:
                    plain += int(samples)
                    mass += weight * int(samples)
                    if piece is not None:
                        part_adds.append((piece[0], weight * int(samples)))
                    if split is None or piece is not None:
                        counted[rank] += 1
                    self.stats.accepted += 1
                    self.stats.staleness[staleness] += 1
                contributions.append(Contribution(
                    node=node, rank=rank, samples=int(samples), version=int(v),
                    staleness=staleness, weight=weight,
                    norm=piece[1] if piece is not None else norms.get(rank, 0.0),
                    step_time=float(header.get("step_time", 0.0)),
                    nbytes=int(gathered[rank].numel()), accepted=not reason, reason=reason))
            if rank in rejected:
                self.stats.rejected += 1
                self._strike(node, rejected[rank])
            elif split is not None:
                adds.extend((data, m) for data, m in part_adds if m > 0)
            elif mass > 0:
                adds.append((payload, mass))
        total = sum(m for _, m in adds)
        aggregate = None
        if total > 0:
            aggregate = self._buffer()
            for data, m in adds:  # normalised as added: no pass over the sum afterwards
                self.codec.decode_add(data, aggregate, m / total)
            self._version += 1
        else:
            self.stats.empty_rounds += 1
        freshness = total / plain if aggregate is not None and plain else 1.0
        contributors = [r for r in counted if r not in rejected]
        steps = (sum(counted[r] for r in contributors) / len(contributors)
                 if aggregate is not None and contributors else 1.0)
        return RoundResult(self.generation, t, self._version, aggregate, contributions,
                           freshness, steps)

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
        self.stats.strikes[node] += 1
        logger.warning("rejected a contribution of %s (%s); strike %d of %d", node, reason,
                       self.stats.strikes[node], self.norm_check.max_strikes)
        if self.stats.strikes[node] >= self.norm_check.max_strikes and self.on_strikes:
            self.on_strikes(node, reason)
