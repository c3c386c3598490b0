"""Fast top-k selection by magnitude on a flat buffer, without an exact `topk` over all of it.

The buffer is viewed as B rows; one reduction pass gives the largest magnitude of each
column (a "group" of B entries, n/B groups). A threshold comes from the last step (a
hint) or from a random sample, aimed a little above k so that the common case is "cap
the small candidate set at exactly k". Only groups whose maximum exceeds it are
gathered and compared entry by entry, so the per-entry work (compare, nonzero) runs on
about B * aim * density * n entries instead of n. A count that is off (below `low * k`,
or above `max_candidates * k`) moves the threshold by a sample-guided secant/bisection
step and tries again on the same group maxima; after `max_passes` an exact selection
over the whole buffer is the fallback, so the result is always correct.

Guarantees: the selected entries are exactly the `count` largest magnitudes (ties at the
boundary broken towards lower indices), `count <= k`, `count >= low * k` unless fewer
than that many entries are non-zero, zeros and NaNs are never selected, and indices come
back as int32 in ascending order.

Cost: two column reductions (amax, amin) over the buffer, then ops on n/B group maxima
and on the gathered groups; B ~ sqrt(1 / (aim * density)) balances the two (8 at 1%,
32 at 0.1%). Extra memory is O(n/B + B * candidates): no full-size scratch. Few ops on
purpose: on a loaded machine each parallel op can wait for a scheduler time slice. On
CUDA the host syncs are the two `nonzero`s of a pass (groups, then entries) and the
capped result's `nonzero`; a hint far too low is rejected at the group count, before
anything large is gathered.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

__all__ = ["Selection", "SelectionConfig", "select_topk", "sample_size", "group_size"]


@dataclass(frozen=True)
class SelectionConfig:
    """Tunables of `select_topk`; the defaults are good for 0.1%..25% densities."""

    sample_hits: int = 128
    """Expected sample entries above the threshold: a sample of `sample_hits / density`
    entries puts the first count within ~9% (one sigma) of its aim."""
    min_sample: int = 4096
    aim: float = 1.25
    """The first pass aims at `aim * k` candidates, so a count below `low * k` is a
    >3 sigma event and the usual result is exactly k."""
    low: float = 0.8
    max_candidates: float = 4.0
    max_passes: int = 4
    """Counts per call before the exact fallback."""
    exact_below: int = 1 << 16
    """Buffers up to this size take the exact path (cheaper than sampling there)."""
    group: int | None = None
    """Entries per group (B); None picks ~sqrt(1 / (aim * density)), a power of 2."""
    block: int = 16
    """The sample reads aligned runs of `block` consecutive entries (a cache line of fp32)."""

    def __post_init__(self) -> None:
        if self.sample_hits < 1 or self.min_sample < 1:
            raise ValueError(
                f"sample_hits ({self.sample_hits}) and min_sample ({self.min_sample}) "
                "must be at least 1")
        if not 0.0 < self.low <= 1.0 <= self.aim < self.max_candidates:
            raise ValueError(
                f"need 0 < low <= 1 <= aim < max_candidates; got low={self.low}, "
                f"aim={self.aim}, max_candidates={self.max_candidates}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"group={self.group} must be at least 1 (or None for automatic)")
        if self.max_passes < 1 or self.block < 1 or self.exact_below < 0:
            raise ValueError(
                f"max_passes ({self.max_passes}) and block ({self.block}) must be at least "
                f"1 and exact_below ({self.exact_below}) at least 0")


DEFAULT_CONFIG = SelectionConfig()


@dataclass(frozen=True)
class Selection:
    """The result of `select_topk`.

    `threshold` (0-dim float32 on the buffer's device) separates the two sets: every
    selected magnitude is >= it and every unselected one is <= it. `hint` is a threshold
    to pass as `hint=` next step on a buffer of similar statistics (aimed at `aim * k`).
    `passes` counts thresholds tried over the whole buffer (1 in the common case, 0 for
    the exact path on small buffers, max_passes + 1 after the exact fallback).
    """

    indices: torch.Tensor
    values: torch.Tensor
    threshold: torch.Tensor
    hint: torch.Tensor
    passes: int

    @property
    def count(self) -> int:
        return int(self.indices.numel())


def group_size(numel: int, k: int, config: SelectionConfig = DEFAULT_CONFIG) -> int:
    """Entries per group: the power of 2 nearest sqrt(1 / (aim * density)), 2..64."""
    if config.group is not None:
        return max(1, min(config.group, numel))
    density = config.aim * max(k, 1) / max(numel, 1)
    best = 2 ** round(math.log2(math.sqrt(1.0 / min(density, 1.0)))) if density > 0 else 64
    return int(max(2, min(best, 64, max(numel // 4, 1))))


def sample_size(numel: int, k: int, config: SelectionConfig = DEFAULT_CONFIG) -> int:
    """Sample entries used to estimate the threshold for k of numel (a multiple of block)."""
    density = max(k, 1) / max(numel, 1)
    wanted = max(config.min_sample, math.ceil(config.sample_hits / density))
    wanted = min(wanted, max(numel // 4, config.block))
    return max(config.block, (wanted + config.block - 1) // config.block * config.block)


_generators: dict[str, torch.Generator] = {}
_generators_lock = threading.Lock()
_SEED = 0x5EED_70BC


def _generator(device: torch.device) -> torch.Generator:
    """A private generator per device, so sampling never moves the user's RNG streams."""
    key = str(device)
    with _generators_lock:
        gen = _generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(_SEED)
            _generators[key] = gen
        return gen


class _Sample:
    """Sorted magnitudes of a random sample: a model of the count above any threshold."""

    def __init__(self, x: torch.Tensor, size: int, block: int, gen: torch.Generator) -> None:
        rows = x[: x.numel() // block * block].view(-1, block)
        picks = torch.randint(0, rows.shape[0], (size // block,), generator=gen,
                              device=x.device)
        mags = rows.index_select(0, picks).view(-1).float().abs_()
        self.values = mags.nan_to_num_(nan=0.0, posinf=torch.finfo(torch.float32).max)
        self.size = self.values.numel()
        self.scale = x.numel() / self.size
        self._sorted: torch.Tensor | None = None

    def quantile(self, count: float) -> torch.Tensor:
        """The threshold the sample predicts leaves `count` buffer entries above it."""
        hits = int(count / self.scale)
        if hits >= self.size:
            return torch.zeros((), dtype=torch.float32, device=self.values.device)
        hits = max(hits, 0)
        if self._sorted is None:
            # kthvalue is O(sample); sort only once a pass had to be repeated.
            return torch.kthvalue(self.values, self.size - hits).values
        return self._sorted[self.size - 1 - hits]

    def count_above(self, threshold: float) -> float:
        """The count above `threshold` the sample predicts for the whole buffer."""
        if self._sorted is None:
            self._sorted = torch.sort(self.values).values
        at = torch.searchsorted(self._sorted, torch.tensor([threshold], device=self._sorted.device),
                                right=True)
        return (self.size - int(at)) * self.scale


def select_topk(
    x: torch.Tensor,
    k: int,
    *,
    hint: torch.Tensor | float | None = None,
    config: SelectionConfig = DEFAULT_CONFIG,
    generator: torch.Generator | None = None,
) -> Selection:
    """Select (at most, and usually exactly) the k largest-magnitude entries of flat `x`.

    `hint`: the `Selection.hint` of the last step, to skip sampling when it still fits.
    `generator`: for the sample, on x's device (default: a private generator per device
    with a fixed seed, so the user's random streams do not move).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or not x.dtype.is_floating_point:
        raise ValueError(
            "select_topk expects a flat (1-D) floating-point tensor, got "
            f"{type(x).__name__} {getattr(x, 'dtype', '')} "
            f"of shape {tuple(getattr(x, 'shape', ()))}")
    n = x.numel()
    if n >= 2**31:
        raise ValueError(f"select_topk indexes with int32: numel={n} must be below 2**31")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be a non-negative integer")
    x = x.detach().contiguous()
    k = min(k, n)
    if k == 0:
        empty = torch.empty(0, dtype=torch.int64, device=x.device)
        inf = torch.full((), math.inf, device=x.device)
        return _finish(empty, x.index_select(0, empty), inf, inf, passes=0)
    if n <= max(config.exact_below, config.block * 4):
        return _exact(x, k, passes=0)

    gen = generator if generator is not None else _generator(x.device)
    target = config.aim * k
    low = math.ceil(config.low * k)
    limit = max(int(config.max_candidates * k), k + 1)
    groups = _Groups(x, group_size(n, k, config))
    sample: _Sample | None = None
    probes: list[tuple[float, float, bool]] = []  # (threshold, count, exact count?)
    t: torch.Tensor | float | None = _valid_hint(hint, x.device)
    for passes in range(1, config.max_passes + 1):
        fresh = t is None
        if t is None:
            sample = _Sample(x, sample_size(n, k, config), config.block, gen)
            t = sample.quantile(target)
        found, count, exact = groups.collect(t, limit, count_first=not fresh)
        t_value = float(t)
        if found is not None and (count >= low or t_value <= 0.0):
            return _from_candidates(found[0], found[1], k, t_value, config.aim, passes)
        probes.append((t_value, float(count), exact))
        if sample is None:
            sample = _Sample(x, sample_size(n, k, config), config.block, gen)
        t = _next_threshold(probes, target, low, limit, sample)
    return _exact(x, k, passes=config.max_passes + 1)


class _Groups:
    """Largest magnitude of each column of x viewed as B rows (entries j, j+m, j+2m...).

    Column reductions stream the buffer once each; a column of B entries is gathered
    only when its maximum exceeds the threshold.
    """

    def __init__(self, x: torch.Tensor, group: int) -> None:
        self.group = group
        self.m = x.numel() // group
        self.rows = x[: group * self.m].view(group, self.m)
        self.tail = x[group * self.m:]
        # NaN columns come out NaN and are gathered (`not <= t`); NaN is never selected.
        self.maxima = torch.maximum(self.rows.amax(0), self.rows.amin(0).neg_())

    def collect(
        self, t: torch.Tensor | float, limit: int, count_first: bool
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, int, bool]:
        """(indices ascending, values) of all |x| > t, their count, and whether the count
        is exact; None when there are more than `limit` (the count may then be a lower
        bound: a pass stops at the group count when that already exceeds the limit).

        `count_first`: count the columns before listing them (a hinted or refined
        threshold may be far too low; a fresh sample's is not).
        """
        hit = torch.le(self.maxima, t).logical_not_()
        # Every hit column holds at least one candidate (or a NaN): its count bounds.
        if count_first:
            width = int(torch.count_nonzero(hit))
            if width > limit:
                return None, width, False
        cols = torch.nonzero(hit).view(-1)
        width = cols.numel()
        if width > limit:
            return None, width, False
        members = self.rows.index_select(1, cols)  # (B, width), contiguous
        flat = torch.nonzero(members.abs().view(-1) > t).view(-1)
        row = torch.div(flat, width, rounding_mode="floor") if width else flat
        idx = cols.index_select(0, flat - row * width).add_(row * self.m)
        values = members.view(-1).index_select(0, flat)
        if self.tail.numel():
            extra = torch.nonzero(self.tail.abs() > t).view(-1)
            idx = torch.cat([idx, extra + self.rows.numel()])
            values = torch.cat([values, self.tail.index_select(0, extra)])
        count = idx.numel()
        if count > limit:
            return None, count, True
        return (idx, values), count, True


def _valid_hint(
    hint: torch.Tensor | float | None, device: torch.device
) -> torch.Tensor | float | None:
    if hint is None:
        return None
    if isinstance(hint, torch.Tensor):
        if hint.numel() != 1:
            raise ValueError(f"hint must be a scalar threshold, got shape {tuple(hint.shape)}")
        if hint.device != device:
            hint = hint.to(device)
        if hint.device.type == "cpu":
            hint = float(hint)
        else:
            return hint.reshape(()).float().nan_to_num(0.0, posinf=0.0).clamp(min=0.0)
    value = float(hint)
    if not math.isfinite(value) or value < 0.0:
        return None
    return value


def _next_threshold(
    probes: list[tuple[float, float, bool]], target: float, low: int, limit: int,
    sample: _Sample,
) -> float:
    """The next threshold: a sample-guided step, or a secant/bisection inside the bracket.

    Counts above `limit` may be lower bounds only (the pass stopped at the group count).
    """
    too_low = [t for t, c, _ in probes if c > limit]       # too many candidates
    too_high = [t for t, c, _ in probes if c < low]         # too few
    lo = max(too_low) if too_low else None
    hi = min(too_high) if too_high else None
    t_last, c_last, exact_last = probes[-1]
    if lo is not None and hi is not None and len(probes) >= 2 and lo > 0.0:
        c_lo = max(c for t, c, _ in probes if t == lo)
        c_hi = min(c for t, c, _ in probes if t == hi)
        if c_hi > 0:
            # Secant on log(count) against log(threshold): linear for power-law tails.
            frac = (math.log(c_lo) - math.log(target)) / (math.log(c_lo) - math.log(c_hi))
            guess = math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))
        else:
            guess = math.sqrt(lo * hi)
    else:
        # The sample's shape, corrected by how far off it was at the last threshold.
        predicted = sample.count_above(t_last)
        usable = exact_last and predicted > 0 and c_last > 0
        goal = target * predicted / c_last if usable else target
        guess = float(sample.quantile(goal))
    inside = (lo is None or guess > lo) and (hi is None or guess < hi)
    if inside and all(guess != t for t, _, _ in probes):
        return guess
    # Bisection (geometric where both ends are positive).
    if lo is None:
        return hi * 0.5 if hi is not None and hi > 0 else 0.0
    if hi is None:
        return lo * 2.0 if lo > 0 else float(sample.quantile(target * 0.5)) or 1e-30
    return math.sqrt(lo * hi) if lo > 0 else hi * 0.25


def _top_positions(
    mags: torch.Tensor, k: int, drop_zeros: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions of the k largest of `mags` (ties: lowest positions first).

    Returns (positions, boundary magnitude). Few ops on purpose: on a busy CPU every op
    above the parallel grain size can wait for a worker thread to be scheduled.
    """
    m = mags.numel()
    if k >= m:
        keep = mags > 0 if drop_zeros else torch.ones_like(mags, dtype=torch.bool)
        return torch.nonzero(keep).view(-1), torch.zeros((), device=mags.device)
    kth = torch.kthvalue(mags, m - k + 1).values
    keep = mags >= kth
    # More than k at or above the boundary only when it is tied; CPU checks (a free
    # read), CUDA always resolves with a cumsum (no host sync).
    if mags.is_cuda or int(torch.count_nonzero(keep)) > k:
        above = mags > kth
        ties = keep & ~above
        keep = above | (ties & (torch.cumsum(ties, 0) <= k - above.sum()))
    if drop_zeros:
        keep &= mags > 0
    return torch.nonzero(keep).view(-1), kth


def _exact(x: torch.Tensor, k: int, passes: int) -> Selection:
    """Exact top-k over the whole buffer (small buffers, and the fallback)."""
    mags = torch.nan_to_num(x.abs().float(), nan=-1.0, posinf=math.inf)
    idx, kth = _top_positions(mags, k, drop_zeros=True)
    threshold = torch.clamp(kth.float(), min=0.0)
    return _finish(idx, x.index_select(0, idx), threshold, threshold, passes)


def _from_candidates(
    cand: torch.Tensor, values: torch.Tensor, k: int, t: float, aim: float, passes: int
) -> Selection:
    """Cap the candidates (all |x| > t, ascending, and their values) at exactly k;
    derive the next hint."""
    count = cand.numel()
    t_tensor = torch.tensor(t, dtype=torch.float32, device=values.device)
    if count <= k:
        threshold = values.abs().min().float() if count else t_tensor
        return _finish(cand, values, threshold, t_tensor, passes)
    pos, kth = _top_positions(values.abs().float(), k, drop_zeros=False)
    kth = kth.float()
    if t > 0.0:
        # Log-log interpolation between (kth, k) and (t, count), aimed at aim * k.
        ratio = min(math.log(aim) / math.log(count / k), 4.0)
        hint = torch.pow(kth.clamp(min=1e-30), 1.0 - ratio) * (t ** ratio)
    else:
        hint = kth
    return _finish(cand.index_select(0, pos), values.index_select(0, pos), kth, hint, passes)


def _finish(
    idx: torch.Tensor, values: torch.Tensor, threshold: torch.Tensor, hint: torch.Tensor,
    passes: int,
) -> Selection:
    return Selection(
        indices=idx.to(torch.int32),
        values=values,
        threshold=threshold.reshape(()).float(),
        hint=hint.reshape(()).float(),
        passes=passes,
    )
