"""The rounds' decisions as pure logic: NormCheck (non-finite and outlying norms, with and
without history), the header check of a member's message, a member's round deadline."""

from __future__ import annotations

import math

import pytest
import torch

from elastic.staleness.decide import NormCheck, Refusal
from elastic.staleness.wire import checked, pack, unpack


def test_non_finite_norms_are_rejected_even_alone() -> None:
    check = NormCheck()
    assert check.judge({0: math.nan, 1: math.inf}) == {0: Refusal.NONFINITE,
                                                       1: Refusal.NONFINITE}


def test_outlier_needs_enough_norms_in_the_round_without_history() -> None:
    check = NormCheck()
    # Two norms without history: no majority, so a wild disagreement skips both.
    assert check.judge({0: 1.0, 1: 1e4}) == {0: Refusal.UNSETTLED, 1: Refusal.UNSETTLED}
    assert check.judge({0: 1.0, 1: 5.0}) == {}
    assert check.judge({0: 1.0, 1: 1.1, 2: 1e4}) == {2: Refusal.OUTLIER}


def test_history_lets_a_thin_round_bechecked() -> None:
    check = NormCheck()
    recent = [1.0, 0.9, 1.2]
    assert set(check.judge({1: 1e4}, recent)) == {1}
    assert check.judge({1: 5.0}, recent) == {}


@pytest.mark.parametrize("kwargs", [{"factor": 1.0}, {"history": -1}, {"max_strikes": 0},
                                    {"min_contributions": 0}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="NormCheck needs"):
        NormCheck(**kwargs)


@pytest.mark.parametrize("parts", [[4], [3, 1, 0], "4", [2, -1, 3], [2.0, 2]])
def test_a_message_whose_parts_do_not_fit_its_payload_is_malformed(parts: object) -> None:
    header = {"contribs": [[8, 0], [8, 1]], "parts": parts}
    with pytest.raises(ValueError, match="parts must give the payload's 4 bytes"):
        checked(*unpack(pack(header, torch.zeros(4, dtype=torch.uint8))))


def test_parts_that_fit_pass_the_header_check() -> None:
    header = {"contribs": [[8, 0], [8, 1]], "parts": [0, 4]}
    header_out, payload = checked(*unpack(pack(header, torch.arange(4, dtype=torch.uint8))))
    assert header_out["parts"] == [0, 4] and payload.tolist() == [0, 1, 2, 3]


def test_a_member_blocked_on_the_last_round_waits_for_its_next_gradient_from_then() -> None:
    from collections import deque

    from elastic.rounds import StalenessRounds

    rounds = StalenessRounds.__new__(StalenessRounds)  # the deadline logic alone
    rounds.round_deadline, rounds._own_times = None, deque([0.1])
    rounds._released, rounds._delivered = 100.0, None
    # Released at 100 s, its gradient was due at 100.1 s: the round's pace decides.
    assert rounds._own_deadline(start=104.9, pace=0.1) == pytest.approx(105.0)
    # The training thread waited for the round delivered at 105 s: it computes from then.
    rounds._delivered = 105.0
    assert rounds._own_deadline(start=104.9, pace=0.1) == pytest.approx(105.15)
    # A member much slower than the pace never holds a round for its gradient.
    rounds._own_times = deque([1.0])
    assert rounds._own_deadline(start=104.9, pace=0.1) == pytest.approx(105.0)


def test_stats_of_two_generations_add_up_and_keep_one_strike_count() -> None:
    from collections import Counter

    from elastic.codecs.stats import RoundStats

    strikes = Counter({"node-a": 1})
    first = RoundStats(rounds=10, empty_rounds=1, bytes_sent=100, dense_bytes=1000,
                       accepted=27, dropped_stale=2, rejected=1, staleness=Counter({0: 20, 1: 7}),
                       strikes=strikes, last_density=0.1, residual_norm=3.0)
    strikes["node-a"] += 1  # the next generation goes on counting in the same record
    second = RoundStats(rounds=5, bytes_sent=50, dense_bytes=500, accepted=10,
                        staleness=Counter({1: 10}), strikes=strikes, last_density=0.01,
                        residual=lambda: 4.5)
    total = first.plus(second).as_dict()
    assert (total["rounds"], total["empty_rounds"], total["accepted"], total["dropped_stale"],
            total["rejected"], total["bytes_sent"]) == (15, 1, 37, 2, 1, 150)
    assert total["staleness_histogram"] == {0: 20, 1: 17}
    assert total["strikes"] == {"node-a": 2}
    assert total["density"] == 0.01 and total["residual_norm"] == 4.5
    assert total["compression_ratio"] == 10.0
