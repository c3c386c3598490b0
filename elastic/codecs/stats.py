"""What exchanging gradients cost and saved, counted alike by top-k and staleness rounds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RoundStats"]


@dataclass
class RoundStats:
    """Counters a user reads to see what rounds cost and saved."""

    rounds: int = 0
    empty_rounds: int = 0
    bytes_sent: int = 0
    dense_bytes: int = 0
    accepted: int = 0
    dropped_stale: int = 0
    rejected: int = 0
    unsettled: int = 0
    """Contributions skipped without a strike: no majority to judge their norm by."""
    nonfinite_rounds: int = 0
    """Rounds in which every payload sent was non-finite (nothing applied)."""
    robust_dropped: int = 0
    """Contributions robust aggregation left out (HORDE_ROBUST_AGGREGATION; F a round)."""
    robust_dropped_ranks: Counter = field(default_factory=Counter)
    """The same, per rank of the sender."""
    staleness: Counter = field(default_factory=Counter)
    strikes: Counter = field(default_factory=Counter)
    last_density: float = 1.0
    residual_norm: float = 0.0
    residual: Callable[[], float] | None = field(default=None, repr=False, compare=False)
    """Computes the residual norm when the stats are read (a pass over the residual is
    not worth taking every step); else `residual_norm` is reported."""

    def plus(self, later: RoundStats) -> RoundStats:
        """These counts and a later stream's together (generations of one optimizer): the
        counters add up; density, residual and strikes are the later's (a node's strikes
        are one count that the streams share)."""
        return RoundStats(
            rounds=self.rounds + later.rounds, empty_rounds=self.empty_rounds + later.empty_rounds,
            bytes_sent=self.bytes_sent + later.bytes_sent,
            dense_bytes=self.dense_bytes + later.dense_bytes,
            accepted=self.accepted + later.accepted,
            dropped_stale=self.dropped_stale + later.dropped_stale,
            rejected=self.rejected + later.rejected, unsettled=self.unsettled + later.unsettled,
            nonfinite_rounds=self.nonfinite_rounds + later.nonfinite_rounds,
            robust_dropped=self.robust_dropped + later.robust_dropped,
            robust_dropped_ranks=self.robust_dropped_ranks + later.robust_dropped_ranks,
            staleness=self.staleness + later.staleness,
            strikes=later.strikes, last_density=later.last_density,
            residual_norm=later.residual_norm, residual=later.residual)

    def as_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds, "empty_rounds": self.empty_rounds,
            "bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes,
            "compression_ratio": (self.dense_bytes / self.bytes_sent) if self.bytes_sent else 1.0,
            "accepted": self.accepted, "dropped_stale": self.dropped_stale,
            "rejected": self.rejected, "unsettled": self.unsettled,
            "nonfinite_rounds": self.nonfinite_rounds,
            "robust_dropped": self.robust_dropped,
            "robust_dropped_ranks": dict(sorted(self.robust_dropped_ranks.items())),
            "staleness_histogram": dict(sorted(self.staleness.items())),
            "strikes": dict(self.strikes), "density": self.last_density,
            "residual_norm": self.residual() if self.residual else self.residual_norm,
        }
