"""Robust aggregation: leave out the contributions furthest from the others (multi-Krum).

Used by the paths that see each member's gradient (synchronous top-k, staleness rounds)
when `HORDE_ROBUST_AGGREGATION=F` (`horderun --robust-aggregation F`) is set. Each
member's gradient is scored by the summed squared distances to its `m - F - 1` nearest
others (Krum, Blanchard et al., "Machine learning with adversaries: Byzantine tolerant
gradient descent", 2017, sums `m - F - 2`); the F members most suspect are left out and
the rest averaged. A sign-flipped or scaled gradient is far from every honest one,
whatever coordinates it sends: a contribution-level rule suits sparse payloads, where a
coordinate-wise statistic mostly sees zeros. Suspicion is the score relative to the
round's median, smoothed over the stream's rounds per rank, so a member that attacks
every round is recognised even when one noisy round would not tell. Deterministic: every
member scores the same bytes alike (float64; ties leave out the higher rank), so
parameters stay identical.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

__all__ = ["MultiKrum", "robust_applies"]

#: Weight of a round's score in a rank's smoothed suspicion (the rest is its past).
SUSPICION_WEIGHT = 0.1
#: A rank whose smoothed suspicion stays above this (its score twice the round's median,
#: round after round) is left out of rounds too small to outvote it.
SUSPECT = 2.0


def robust_applies(members: int, f: int) -> bool:
    """Whether F can be outvoted among `members` contributions: a majority of honest ones
    is needed (F < members / 2); fewer are averaged as they are."""
    return f > 0 and members > 2 * f


class MultiKrum:
    """Chooses which contributions enter an aggregate; keeps each rank's suspicion over the
    rounds of one stream (every member starts it together: a generation, a new optimizer)."""

    def __init__(self, f: int) -> None:
        if f < 0:
            raise ValueError(f"robust aggregation F={f} must be >= 0 (0: off)")
        self.f = f
        self.suspicion: dict[int, float] = {}

    def keep(self, vectors: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[int]:
        """The positions (ascending) in `vectors` (the gradients of `ranks`) that enter the
        aggregate: all but the F most suspect, or all when `robust_applies` is false."""
        m = len(vectors)
        if not robust_applies(m, self.f):
            return self._known_suspects_out(ranks)
        scores = krum_scores(vectors, self.f)
        middle = statistics.median(scores)
        suspicion = []
        for rank, score in zip(ranks, scores):
            z = score / middle if middle > 0 else (0.0 if score == 0 else 2.0)
            s = self.suspicion.get(rank, 1.0)
            s = (1 - SUSPICION_WEIGHT) * s + SUSPICION_WEIGHT * z
            self.suspicion[rank] = s
            # A round far above the median (a large scaled gradient) counts at once.
            suspicion.append(max(s, z / 2))
        # Most suspect first, the higher rank first among equals: those f are left out.
        order = sorted(range(m), key=lambda i: (suspicion[i], ranks[i]), reverse=True)
        return sorted(order[self.f:])


    def _known_suspects_out(self, ranks: Sequence[int]) -> list[int]:
        """A round too small to outvote F (a slow member's round, a straggler's): leave out
        up to F ranks that past rounds marked as suspect, never every contribution."""
        suspects = sorted((i for i, r in enumerate(ranks)
                           if self.suspicion.get(r, 1.0) > SUSPECT),
                          key=lambda i: (self.suspicion[ranks[i]], ranks[i]), reverse=True)
        out = set(suspects[:self.f])
        if len(out) == len(ranks):
            return list(range(len(ranks)))
        return [i for i in range(len(ranks)) if i not in out]


def krum_scores(vectors: Sequence[torch.Tensor], f: int) -> list[float]:
    """Per vector, the sum of its squared distances to its `m - f - 1` nearest others."""
    m = len(vectors)
    flat = [v.reshape(-1) for v in vectors]
    distances = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            # Differences, not the Gram identity: no cancellation between large norms;
            # summed in float64, so rounding cannot reorder scores but for near-ties.
            diff = (flat[i] - flat[j]).to(torch.float64)
            distances[i, j] = distances[j, i] = float(torch.dot(diff, diff))
    nearest = max(1, m - f - 1)  # its honest peers, were it honest
    scores = []
    for i in range(m):
        others = torch.cat([distances[i, :i], distances[i, i + 1:]])
        scores.append(float(others.sort().values[:nearest].sum()))
    return scores
