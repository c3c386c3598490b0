"""`elastic.core.adasum` without processes: the tree order, the formula, and applying coefficients
computed elsewhere (what every rank but one does)."""

from __future__ import annotations

import pytest
import torch

from elastic.core.adasum import CHUNK, reduce_parts, tree_steps


def direct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    dot, aa, bb = float(a @ b), float(a @ a), float(b @ b)
    return ((1 - dot / (2 * aa)) if aa >= 1e-8 else 1.0) * a + \
        ((1 - dot / (2 * bb)) if bb >= 1e-8 else 1.0) * b


@pytest.mark.parametrize(("size", "steps"), [
    (1, []),
    (2, [(0, 1)]),
    (3, [(0, 1), (0, 2)]),
    (4, [(0, 1), (2, 3), (0, 2)]),
    (5, [(0, 1), (2, 3), (0, 2), (0, 4)]),
    (6, [(0, 1), (2, 3), (4, 5), (0, 2), (0, 4)]),
    (8, [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (4, 6), (0, 4)]),
])
def test_tree_order(size: int, steps: list[tuple[int, int]]) -> None:
    assert tree_steps(size) == steps


def test_tree_needs_a_rank() -> None:
    with pytest.raises(ValueError, match="size=0"):
        tree_steps(0)


def test_reduce_parts_is_the_formula_per_tensor_and_applies_given_coefficients() -> None:
    gen = torch.Generator().manual_seed(0)
    ranks = [torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(5)]
    ranks[3].zero_()  # a zero contribution is neutral
    counts = [3, 4]
    got, coefficients = reduce_parts([r.clone() for r in ranks], counts)
    for lo, hi in ((0, 3), (3, 7)):
        s = [r[lo:hi] for r in ranks]
        expected = direct(direct(direct(s[0], s[1]), direct(s[2], s[3])), s[4])
        assert torch.allclose(got[lo:hi], expected, atol=1e-12)
    again, _ = reduce_parts([r.clone() for r in ranks], counts, coefficients)
    assert torch.equal(again, got), "applying the coefficients gives the same bits"
    with pytest.raises(ValueError, match="do not fit 5 ranks and 1 tensors"):
        reduce_parts([r.clone() for r in ranks], [7], coefficients)


def test_zeros_everywhere_stay_zero() -> None:
    got, coefficients = reduce_parts([torch.zeros(4) for _ in range(3)], [4])
    assert torch.equal(got, torch.zeros(4))
    assert torch.equal(coefficients, torch.ones(2, 1, 2, dtype=torch.float64))


def test_tensors_longer_than_a_chunk() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 3 * CHUNK + 5
    ranks = [torch.randn(n, generator=gen) for _ in range(3)]
    got, _ = reduce_parts([r.clone() for r in ranks], [n])
    expected = direct(direct(ranks[0], ranks[1]).float(), ranks[2])
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
