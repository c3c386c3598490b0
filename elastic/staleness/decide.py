"""What a staleness round decides, as a pure function of what every member received.

Every member of a round sees the same messages (one allgather) and runs `decide_round`
on them with the same state, so every member accepts, drops and weighs the same
contributions and applies the same aggregate: parameters stay bit-identical. Nothing
here touches the network, a thread or a clock; `elastic.staleness.rounds` runs it.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Add", "Contribution", "Entry", "NormCheck", "Refusal", "RoundDecision", "decide_round",
    "inverse_staleness",
]


def inverse_staleness(staleness: int) -> float:
    """Default weight of a contribution `staleness` aggregates old: 1/(1+staleness)."""
    return 1.0 / (1.0 + staleness)


class Refusal(str, enum.Enum):
    """Why a contribution did not enter its round's aggregate (a code, not prose)."""

    STALE = "stale"
    """Its staleness exceeded the bound S: dropped (no strike)."""
    NONFINITE = "nonfinite"
    """Its payload held NaN/Inf or could not be decoded (a strike)."""
    OUTLIER = "outlier"
    """Its norm exceeded the norm check's factor times the recent median (a strike)."""
    MALFORMED = "malformed"
    """Its member's message could not be read (a strike)."""
    NO_PAYLOAD = "no_payload"
    """Announced in the header, but no bytes came with it."""
    UNSETTLED = "unsettled"
    """Too few norms to tell an outlier by majority (two members, or one, with no
    history), and this one's norm disagrees with the others' by more than the factor (or
    has nothing to compare with) and no past of its own vouches for it: skipped, no
    strike (nobody can tell whose fault it is), not fed back into a top-k residual (it
    would come again in every round)."""

    @property
    def strikes(self) -> bool:
        """Whether this refusal costs the contributing node a strike."""
        return self in (Refusal.NONFINITE, Refusal.OUTLIER, Refusal.MALFORMED)


@dataclass(frozen=True)
class Contribution:
    """What every member knows about one member's contribution to one round.

    `reason` explains a refusal to a person; `refusal` is its code (None when accepted).
    """

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
    refusal: Refusal | None = None


@dataclass(frozen=True)
class NormCheck:
    """Rejects non-finite contributions, those whose norm exceeds `factor` x the median of
    this round's norms and the recently accepted ones (`history` of them are kept, so a
    round with few contributors is still checked), and those above `factor` x the median
    of their own node's accepted norms. With fewer than `min_contributions` norms to take
    a median of (two members and no history yet), norms that differ by more than `factor`
    are skipped (`Refusal.UNSETTLED`) unless their node's own past vouches for them: a
    first round cannot let a 10^6x gradient in."""

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

    def judge(self, norms: dict[int, float], recent: Sequence[float] = (),
              own: Mapping[int, Sequence[float]] | None = None, members: int = 0
              ) -> dict[int, Refusal]:
        """Refusals keyed by rank (deterministic on every member, which all pass the same
        `recent` norms and `own` norms per rank: its node's accepted norms):
        NONFINITE for a non-finite norm, OUTLIER above a limit, UNSETTLED when there is
        no majority to judge by. `members`: the generation's size (a lone contribution
        with nothing to compare with is skipped when there are other members)."""
        own = own or {}
        bad = {r: Refusal.NONFINITE for r, n in norms.items() if not math.isfinite(n)}
        finite = {r: n for r, n in norms.items() if r not in bad}
        for r, n in finite.items():  # each node against its own past
            past = own.get(r, ())
            if len(past) >= self.min_contributions:
                median = statistics.median(past)
                if median > 0 and n > self.factor * median:
                    bad[r] = Refusal.OUTLIER
        reference = list(finite.values()) + list(recent)
        if len(reference) >= self.min_contributions:  # a majority: the median
            median = statistics.median(reference)
            for r, n in finite.items():
                if r not in bad and median > 0 and n > self.factor * median:
                    bad[r] = Refusal.OUTLIER
            return bad
        left = {r: n for r, n in finite.items() if r not in bad}
        reference = list(left.values()) + list(recent)
        alone = len(reference) == 1 and members > 1
        low, high = (min(reference), max(reference)) if reference else (0.0, 0.0)
        if not alone and high <= self.factor * low:
            return bad  # they agree (or nothing to judge)
        for r, n in left.items():  # no majority: only a node's own past can vouch
            past = own.get(r, ())
            if not (past and n <= self.factor * statistics.median(past)):
                bad[r] = Refusal.UNSETTLED
        return bad


@dataclass(frozen=True)
class Entry:
    """One member's message in a round, as every member decoded it.

    `norm`: of the whole payload (None: it sent no payload; NaN: not decodable).
    `part_norms`: for a message in parts (one per contribution; None for a part without
    bytes), else None. `malformed`: why the message could not be read (it then counts
    as carrying nothing).
    """

    contribs: tuple[tuple[int, int], ...] = ()
    """(samples, parameter version) of each contribution, in the sender's order."""
    norm: float | None = None
    part_norms: tuple[float | None, ...] | None = None
    step_time: float = 0.0
    nbytes: int = 0
    malformed: str | None = None
    lrs: tuple[float, ...] | None = None
    """The sender's learning rates, one per param group (when it sent them)."""


@dataclass(frozen=True)
class Add:
    """Add the payload of `rank` (or its part `part`) with weight `mass / total`."""

    rank: int
    part: int | None
    mass: float


@dataclass
class RoundDecision:
    """What a round decided, identical on every member."""

    contributions: list[Contribution]
    adds: list[Add]
    """What enters the aggregate, in rank order; none: an empty round."""
    plain: int = 0
    """Accepted samples, unweighted."""
    rejected: dict[int, Refusal] = field(default_factory=dict)
    """Members whose whole message was refused."""
    strikes: list[int] = field(default_factory=list)
    """The rejected members that earn their node a strike: a striking refusal
    (`Refusal.strikes`), unless every member that sent a payload sent non-finite values
    (then the shared parameters are at fault, not one sender)."""
    nonfinite: bool = False
    """Payloads were sent and every one of them was non-finite (the rounds count these to
    stop a job whose model became non-finite)."""
    node_norms: dict[str, float] = field(default_factory=dict)
    """The norms of the members not rejected, by node (each node's own history)."""
    reasons: dict[int, str] = field(default_factory=dict)
    """The refusals of `rejected`, explained."""
    accepted_norms: list[float] = field(default_factory=list)
    """Norms of the members not rejected, in rank order (the norm check's history)."""
    dropped_stale: int = 0
    staleness: Counter = field(default_factory=Counter)
    """Accepted contributions by staleness."""
    counted: Counter = field(default_factory=Counter)
    """Accepted contributions per rank."""
    lrs: list[float] | None = None
    """The learning rates to apply the aggregate with, the same on every member: per param
    group the least that the members sent (a peer cannot speed everyone up), over the
    messages with as many groups as the lowest rank's; None when none sent any."""

    @property
    def total(self) -> float:
        """The weighted samples of the aggregate (its normaliser)."""
        return sum(add.mass for add in self.adds)

    @property
    def accepted(self) -> int:
        return sum(self.staleness.values())

    @property
    def steps(self) -> float:
        """Accepted contributions per member that contributed: how many steps of its
        members the aggregate stands for (1.0 for an empty round)."""
        if self.total <= 0 or not self.counted:
            return 1.0
        return sum(self.counted.values()) / len(self.counted)

    @property
    def freshness(self) -> float:
        """sum w(s) n / sum n over the accepted contributions (1.0 for an empty round)."""
        total = self.total
        return total / self.plain if total > 0 and self.plain else 1.0


def decide_round(entries: Sequence[Entry], members: Sequence[str], version: int,
                 staleness: int, norm_check: NormCheck, recent: Sequence[float] = (),
                 weight: Callable[[int], float] = inverse_staleness,
                 own: Mapping[str, Sequence[float]] | None = None) -> RoundDecision:
    """Decide a round from every member's message (`entries`, by rank).

    `members`: node ids by rank (a member is who the generation places at its rank,
    whatever its header claims); `version`: aggregates applied before this round;
    `staleness`: the bound S; `recent`: the norms the norm check remembers; `own`: the
    accepted norms it remembers per node.
    A contribution `version - v` aggregates old is dropped above S, weighed `weight(s)`
    otherwise; a member whose message is malformed, undecodable or an outlier is
    rejected whole.
    """
    norms: dict[int, float] = {}
    for rank, entry in enumerate(entries):
        if entry.malformed is not None:
            norms[rank] = math.nan
        elif entry.part_norms is not None:
            # One bad part rejects the message, as a bad average would.
            parts = [n for n in entry.part_norms if n is not None]
            if parts:
                norms[rank] = max(parts) if all(map(math.isfinite, parts)) else math.nan
        elif entry.norm is not None:
            norms[rank] = entry.norm
    own = own or {}
    judged = norm_check.judge({r: n for r, n in norms.items()
                               if entries[r].malformed is None}, recent,
                              {r: own.get(node, ()) for r, node in enumerate(members)},
                              len(members))
    rejected = {**judged, **{r: Refusal.MALFORMED for r, e in enumerate(entries)
                             if e.malformed is not None}}
    sent_lrs = [entry.lrs for entry in entries if entry.lrs is not None]
    decision = RoundDecision(
        [], [], rejected=rejected,
        lrs=[float(min(column)) for column in
             zip(*(x for x in sent_lrs if len(x) == len(sent_lrs[0])))] if sent_lrs else None,
        reasons={r: _explain(code, entries[r], norms[r], norm_check)
                 for r, code in rejected.items()},
        accepted_norms=[n for r, n in sorted(norms.items()) if r not in rejected],
        node_norms={members[r]: n for r, n in sorted(norms.items()) if r not in rejected},
        nonfinite=bool(norms) and not any(map(math.isfinite, norms.values())))
    # Every payload non-finite, a lone one included (the others' came late, or there are
    # none): nothing finite shows the fault is the sender's rather than the shared
    # parameters', so nobody is struck (striking a lone sender made a model gone
    # non-finite blacklist whichever member happened to be alone in a round).
    decision.strikes = [r for r, code in sorted(rejected.items())
                        if code.strikes and not decision.nonfinite]
    for rank, entry in enumerate(entries):
        node = members[rank]
        mass = 0.0
        part_adds: list[Add] = []
        for i, (samples, v) in enumerate(entry.contribs):
            age = version - int(v)
            part_norm = entry.part_norms[i] if entry.part_norms is not None else None
            refusal: Refusal | None = None
            reason = ""
            if age > staleness:
                refusal, reason = Refusal.STALE, f"staleness {age} exceeds {staleness}"
                decision.dropped_stale += 1
            elif rank in rejected:
                refusal, reason = rejected[rank], decision.reasons[rank]
            elif rank not in norms or (entry.part_norms is not None and part_norm is None):
                refusal, reason = Refusal.NO_PAYLOAD, "no payload"
            w = 0.0 if refusal else weight(age)
            if refusal is None:
                decision.plain += int(samples)
                mass += w * int(samples)
                if entry.part_norms is not None:
                    part_adds.append(Add(rank, i, w * int(samples)))
                decision.counted[rank] += 1
                decision.staleness[age] += 1
            decision.contributions.append(Contribution(
                node=node, rank=rank, samples=int(samples), version=int(v), staleness=age,
                weight=w, norm=part_norm if part_norm is not None else norms.get(rank, 0.0),
                step_time=entry.step_time, nbytes=entry.nbytes, accepted=refusal is None,
                reason=reason, refusal=refusal))
        if rank in rejected:
            continue
        if entry.part_norms is not None:
            decision.adds.extend(add for add in part_adds if add.mass > 0)
        elif mass > 0:
            decision.adds.append(Add(rank, None, mass))
    return decision


def _explain(refusal: Refusal, entry: Entry, norm: float, check: NormCheck) -> str:
    """A refusal of a whole message, for people (logs, `Contribution.reason`)."""
    if refusal is Refusal.MALFORMED:
        return f"malformed message ({entry.malformed})"
    if refusal is Refusal.OUTLIER:
        return f"norm {norm:.3g} exceeds {check.factor:g}x the recent median"
    if refusal is Refusal.UNSETTLED:
        return (f"norm {norm:.3g} disagrees with the round's others by more than "
                f"{check.factor:g}x and there is no history to tell which is right: skipped")
    return "non-finite values"
