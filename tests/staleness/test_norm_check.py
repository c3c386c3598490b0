"""NormCheck's decisions (pure logic): non-finite and outlying norms, with and without history."""

from __future__ import annotations

import math

import pytest

from elastic.rounds import NormCheck


def test_non_finite_norms_are_rejected_even_alone() -> None:
    check = NormCheck()
    assert check.judge({0: math.nan, 1: math.inf}) == {0: "non-finite values",
                                                       1: "non-finite values"}


def test_outlier_needs_enough_norms_in_the_round_without_history() -> None:
    check = NormCheck()
    assert check.judge({0: 1.0, 1: 1e4}) == {}
    assert set(check.judge({0: 1.0, 1: 1.1, 2: 1e4})) == {2}


def test_history_lets_a_thin_round_be_checked() -> None:
    check = NormCheck()
    recent = [1.0, 0.9, 1.2]
    assert set(check.judge({1: 1e4}, recent)) == {1}
    assert check.judge({1: 5.0}, recent) == {}


@pytest.mark.parametrize("kwargs", [{"factor": 1.0}, {"history": -1}, {"max_strikes": 0},
                                    {"min_contributions": 0}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="NormCheck needs"):
        NormCheck(**kwargs)
