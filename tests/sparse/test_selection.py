"""select_topk: count bounds, exactness of the selected set, hints, refinement, fallback."""

from __future__ import annotations

import math

import pytest
import torch

from elastic.codecs import SelectionConfig, group_size, sample_size, select_topk
from tests.sparse.conftest import DEVICES, make_buffer

N = 300_000  # above exact_below, so the sampled threshold path runs


def check_selection(x: torch.Tensor, k: int, sel, low: float = 0.8) -> None:
    """Count bounds, int32 ascending indices, values, and top-`count` exactness."""
    idx = sel.indices
    assert idx.dtype == torch.int32
    nnz = int((x != 0).sum())
    assert sel.count <= k
    assert sel.count >= min(math.ceil(low * k), nnz)
    if sel.count > 1:
        assert bool((idx[1:] > idx[:-1]).all()), "indices must be strictly ascending"
    assert torch.equal(sel.values, x[idx.long()])
    mags = x.abs()
    chosen = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    chosen[idx.long()] = True
    if sel.count:
        assert float(mags[chosen].min()) >= float(sel.threshold)
        assert float(mags[chosen].min()) > 0.0
    if sel.count < x.numel():
        assert float(mags[~chosen].max()) <= float(sel.threshold)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["normal", "heavy", "layers", "sparse"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_count_and_exactness(kind: str, density: float, device: str) -> None:
    x = make_buffer(kind, N, seed=1, device=device)
    k = int(N * density)
    sel = select_topk(x, k)
    check_selection(x, k, sel)
    assert sel.passes >= 1


def test_matches_exact_topk_when_capped() -> None:
    x = make_buffer("normal", N, seed=2)
    k = 3000
    sel = select_topk(x, k)
    assert sel.count == k  # the first pass aims above k and caps: exactly k
    ref = torch.topk(x.abs(), k).indices.sort().values.to(torch.int32)
    assert torch.equal(sel.indices, ref)


def test_hint_skips_sampling_and_stays_correct() -> None:
    k = 3000
    first = select_topk(make_buffer("normal", N, seed=3), k)
    x = make_buffer("normal", N, seed=4)
    again = select_topk(x, k, hint=first.hint)
    check_selection(x, k, again)
    assert again.passes == 1


@pytest.mark.parametrize("hint", [0.0, 1e-6, 50.0, float("inf"), float("nan"), -1.0])
def test_bad_hints_are_refined(hint: float) -> None:
    x = make_buffer("normal", N, seed=5)
    k = 300
    sel = select_topk(x, k, hint=hint)
    check_selection(x, k, sel)


def test_refinement_from_a_poor_sample() -> None:
    # One expected hit in a tiny sample: the first threshold is far off, the passes fix it.
    config = SelectionConfig(sample_hits=1, min_sample=16, exact_below=0)
    x = make_buffer("heavy", N, seed=6)
    for k in (30, 300, 3000):
        sel = select_topk(x, k, config=config)
        check_selection(x, k, sel)


def test_fallback_to_exact_after_max_passes() -> None:
    config = SelectionConfig(max_passes=1)
    x = make_buffer("normal", N, seed=7)
    sel = select_topk(x, 500, hint=40.0, config=config)  # one pass, finds nothing
    assert sel.passes == 2
    assert sel.count == 500
    check_selection(x, 500, sel)


def test_ties_break_towards_lower_indices() -> None:
    x = make_buffer("constant", N)
    sel = select_topk(x, 1000)
    assert sel.count == 1000
    assert torch.equal(sel.indices, torch.arange(1000, dtype=torch.int32))


@pytest.mark.parametrize("n", [1, 10, 5000])
def test_small_buffers_are_exact(n: int) -> None:
    x = make_buffer("normal", n, seed=8)
    for k in {1, max(1, n // 3), n, n + 5}:
        sel = select_topk(x, k)
        assert sel.count == min(k, n)
        check_selection(x, min(k, n), sel, low=1.0)
        assert sel.passes == 0


def test_zero_k_zeros_nan_and_inf() -> None:
    x = make_buffer("normal", N, seed=9)
    assert select_topk(x, 0).count == 0
    assert select_topk(torch.zeros(N), 100).count == 0
    assert select_topk(torch.zeros(100), 10).count == 0
    x[5] = float("nan")
    x[7] = float("inf")
    for buf in (x, x[:1000].clone()):
        sel = select_topk(buf, 50)
        picked = set(sel.indices.tolist())
        assert 7 in picked and 5 not in picked


def test_half_precision_buffer() -> None:
    x = make_buffer("normal", N, seed=10).half()
    sel = select_topk(x, 3000)
    check_selection(x, 3000, sel)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="flat"):
        select_topk(torch.randn(10, 10), 5)
    with pytest.raises(ValueError, match="flat"):
        select_topk(torch.arange(10), 5)
    with pytest.raises(ValueError, match="k=-1"):
        select_topk(torch.randn(10), -1)
    with pytest.raises(ValueError, match="low"):
        SelectionConfig(low=1.5)


def test_sample_size_covers_low_densities() -> None:
    # At 0.1% the sample holds ~128 entries above the threshold: ~9% count error (1 sigma).
    size = sample_size(25_000_000, 25_000)
    assert size * 25_000 / 25_000_000 >= 128
    assert size % 16 == 0
    assert sample_size(100_000, 10) <= 100_000 // 4 + 16


def test_private_generator_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    select_topk(make_buffer("normal", N, seed=11), 300)
    assert torch.equal(torch.rand(3), expected)


def test_far_too_low_hint_is_counted_not_collected() -> None:
    x = make_buffer("layers", N, seed=12)
    sel = select_topk(x, 3000, hint=1e-9)  # every entry passes: refined before nonzero
    check_selection(x, 3000, sel)
    assert sel.passes == 2


@pytest.mark.parametrize("group", [1, 3, 16, 64])
def test_any_group_size_and_a_ragged_tail_give_the_same_set(group: int) -> None:
    x = make_buffer("heavy", N + 13, seed=14)  # N + 13: a tail outside the B rows
    x[-3] = 1e6  # the largest entry sits in the tail
    ref = select_topk(x, 3000, config=SelectionConfig(exact_below=N * 2))  # exact path
    sel = select_topk(x, 3000, config=SelectionConfig(group=group))
    assert torch.equal(sel.indices, ref.indices)
    assert int(sel.indices[-1]) == N + 10


def test_group_size_follows_density() -> None:
    assert group_size(25_000_000, 250_000) == 8
    assert group_size(25_000_000, 25_000) == 32
    assert group_size(25_000_000, 2_500_000) == 4
    assert group_size(1000, 1) <= 250
    assert group_size(10**6, 10, SelectionConfig(group=5)) == 5


def test_non_contiguous_input() -> None:
    x = make_buffer("normal", 2 * N, seed=15)[::2]
    sel = select_topk(x, 3000)
    check_selection(x, 3000, sel)


def test_nan_does_not_hide_its_group() -> None:
    # Group maxima are NaN where a column holds a NaN; that column is still examined.
    x = make_buffer("normal", N, seed=16)
    m = N // 4
    x[10] = float("nan")
    x[10 + m] = 100.0  # same column as the NaN (group=4: entries j, j+m, j+2m, j+3m)
    sel = select_topk(x, 300, config=SelectionConfig(group=4))
    picked = set(sel.indices.tolist())
    assert 10 + m in picked and 10 not in picked
    assert sel.count == 300
