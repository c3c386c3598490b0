"""decide_round as pure logic: what a round accepts, drops, rejects and weighs, and the
codes its refusals carry to the credit reports (no processes, no threads)."""

from __future__ import annotations

import math

import pytest

from elastic.credit.reports import report_from_round, reported_reason
from elastic.staleness import Entry, NormCheck, Refusal, RoundResult, decide_round

MEMBERS = ["a", "b", "c"]


def decide(entries: list[Entry], version: int = 5, staleness: int = 2, **kwargs: object):
    return decide_round(entries, MEMBERS, version, staleness, NormCheck(), **kwargs)


def test_fresh_contributions_are_weighed_by_staleness_and_samples() -> None:
    d = decide([Entry(((8, 5),), norm=1.0), Entry(((4, 4),), norm=1.0),
                Entry(((2, 3),), norm=1.0)])
    assert [c.accepted for c in d.contributions] == [True, True, True]
    assert [c.weight for c in d.contributions] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [(a.rank, a.part) for a in d.adds] == [(0, None), (1, None), (2, None)]
    assert [a.mass for a in d.adds] == [8.0, 2.0, pytest.approx(2 / 3)]
    assert d.plain == 14 and d.freshness == pytest.approx((8 + 2 + 2 / 3) / 14)
    assert d.staleness == {0: 1, 1: 1, 2: 1} and d.accepted == 3 and not d.rejected


def test_a_contribution_above_the_bound_is_dropped_without_a_strike() -> None:
    d = decide([Entry(((8, 5),), norm=1.0), Entry(((8, 2),), norm=1.0), Entry()])
    dropped = d.contributions[1]
    assert not dropped.accepted and dropped.refusal is Refusal.STALE
    assert dropped.reason == "staleness 3 exceeds 2" and dropped.weight == 0.0
    assert d.dropped_stale == 1 and not d.rejected
    assert [a.rank for a in d.adds] == [0]


def test_an_outlier_is_rejected_whole_with_its_norm_in_the_reason() -> None:
    d = decide([Entry(((8, 5),), norm=1.0), Entry(((8, 5),), norm=1.1),
                Entry(((8, 5), (8, 4)), norm=500.0)])
    assert d.rejected == {2: Refusal.OUTLIER}
    assert d.reasons[2] == "norm 500 exceeds 10x the recent median"
    assert [c.refusal for c in d.contributions if c.rank == 2] == [Refusal.OUTLIER] * 2
    assert [a.rank for a in d.adds] == [0, 1]
    assert d.accepted_norms == [1.0, 1.1], "a rejected norm does not enter the history"


def test_history_rejects_an_outlier_in_a_round_of_one() -> None:
    entries = [Entry(((8, 5),), norm=100.0), Entry(), Entry()]
    assert decide(entries, recent=[90.0, 110.0]).rejected == {}
    assert decide(entries, recent=[1.0, 1.2, 0.9]).rejected == {0: Refusal.OUTLIER}


def test_a_lone_first_contribution_with_nothing_to_compare_is_skipped_without_a_strike(
        ) -> None:
    d = decide([Entry(((8, 5),), norm=1e6), Entry(), Entry()])
    assert d.rejected == {0: Refusal.UNSETTLED} and d.strikes == [] and d.adds == []
    assert not Refusal.UNSETTLED.strikes
    alone = decide_round([Entry(((8, 5),), norm=1e6)], ["a"], 5, 2, NormCheck())
    assert alone.rejected == {}, "a generation of one member has nobody to compare with"


def two(entries: list[Entry], **kwargs: object):
    return decide_round(entries, ["honest", "hostile"], 0, 1, NormCheck(), **kwargs)


def test_two_members_that_disagree_wildly_in_a_first_round_are_both_skipped() -> None:
    d = two([Entry(((32, 0),), norm=2.0), Entry(((32, 0),), norm=2e6)])
    assert d.rejected == {0: Refusal.UNSETTLED, 1: Refusal.UNSETTLED}
    assert d.adds == [] and d.strikes == [] and d.accepted == 0
    assert "no history" in d.reasons[1]
    agree = two([Entry(((32, 0),), norm=2.0), Entry(((32, 0),), norm=3.0)])
    assert agree.rejected == {} and [a.rank for a in agree.adds] == [0, 1]


def test_with_a_history_two_members_are_judged_by_the_median() -> None:
    d = two([Entry(((32, 0),), norm=2.0), Entry(((32, 0),), norm=2e6)], recent=[1.5])
    assert d.rejected == {1: Refusal.OUTLIER} and d.strikes == [1]
    assert [a.rank for a in d.adds] == [0]


def test_a_nodes_own_past_vouches_for_it_when_there_is_no_majority() -> None:
    own = {"honest": [2.0], "hostile": []}
    d = two([Entry(((32, 0),), norm=2.5), Entry(((32, 0),), norm=2e6)], own=own)
    assert d.rejected == {1: Refusal.UNSETTLED}, "the honest one's past vouches for it"
    assert [a.rank for a in d.adds] == [0]


def test_a_node_is_judged_against_its_own_past_norms() -> None:
    own = {"a": [1.0, 1.0, 1.0], "b": [50.0, 60.0, 55.0], "c": [1.0, 1.0, 1.0]}
    d = decide([Entry(((8, 5),), norm=1.0), Entry(((8, 5),), norm=55.0),
                Entry(((8, 5),), norm=30.0)], own=own)
    assert d.rejected == {2: Refusal.OUTLIER}, "30 is 30x c's own median; b's 55 is its usual"
    assert d.node_norms == {"a": 1.0, "b": 55.0}


def test_when_every_payload_is_nonfinite_nobody_is_struck() -> None:
    d = two([Entry(((32, 0),), norm=math.nan), Entry(((32, 0),), norm=math.inf)])
    assert d.nonfinite and d.strikes == [] and d.rejected == {0: Refusal.NONFINITE,
                                                               1: Refusal.NONFINITE}
    one = two([Entry(((32, 0),), norm=2.0), Entry(((32, 0),), norm=math.nan)])
    assert not one.nonfinite and one.strikes == [1]


def test_a_lone_nonfinite_payload_is_not_struck() -> None:
    # The other member's payload missed the round: nothing finite to blame the sender by
    # (a model gone non-finite would otherwise strike whoever was alone in a round).
    lone = two([Entry(((32, 0),), norm=math.nan), Entry()])
    assert lone.nonfinite and lone.rejected == {0: Refusal.NONFINITE} and lone.strikes == []
    assert lone.adds == []


def test_malformed_and_undecodable_messages_are_rejected_with_their_own_codes() -> None:
    d = decide([Entry(malformed="the header is list, not an object"),
                Entry(((8, 5),), norm=math.nan), Entry(((8, 5),), norm=1.0)], recent=[1.0])
    assert d.rejected == {0: Refusal.MALFORMED, 1: Refusal.NONFINITE}
    assert d.reasons[0] == "malformed message (the header is list, not an object)"
    assert d.reasons[1] == "non-finite values"
    assert all(code.strikes for code in d.rejected.values())
    assert [a.rank for a in d.adds] == [2]


def test_an_announced_contribution_without_bytes_has_no_payload() -> None:
    d = decide([Entry(((8, 5),)), Entry(((8, 5), (4, 4)), part_norms=(1.0, None)), Entry()],
               recent=[1.0])
    refusals = [(c.rank, c.refusal) for c in d.contributions]
    assert refusals == [(0, Refusal.NO_PAYLOAD), (1, None), (1, Refusal.NO_PAYLOAD)]
    assert not Refusal.NO_PAYLOAD.strikes and not d.rejected
    assert [(a.rank, a.part, a.mass) for a in d.adds] == [(1, 0, 8.0)]


def test_parts_are_weighed_each_by_its_own_staleness() -> None:
    d = decide([Entry(((8, 5), (8, 4), (8, 1)), part_norms=(1.0, 2.0, 3.0))],
               recent=[1.0, 2.0])
    assert [(a.part, a.mass) for a in d.adds] == [(0, 8.0), (1, 4.0)]
    assert [c.norm for c in d.contributions] == [1.0, 2.0, 3.0]
    assert d.contributions[2].refusal is Refusal.STALE


def test_one_bad_part_rejects_the_whole_message() -> None:
    d = decide([Entry(((8, 5), (8, 4)), part_norms=(1.0, math.inf)), Entry(), Entry()])
    assert d.rejected == {0: Refusal.NONFINITE} and d.adds == []


def test_an_empty_round_has_no_adds_and_full_freshness() -> None:
    d = decide([Entry(), Entry(), Entry()])
    assert d.adds == [] and d.total == 0 and d.freshness == 1.0 and d.contributions == []


def test_every_member_decides_the_same() -> None:
    entries = [Entry(((8, 5), (3, 3)), part_norms=(1.0, 1.5)), Entry(((8, 2),), norm=1.0),
               Entry(((4, 4),), norm=40.0)]
    first = decide(entries, recent=[1.0, 1.1])
    again = decide(list(entries), recent=[1.0, 1.1])
    assert first.contributions == again.contributions and first.adds == again.adds


@pytest.mark.parametrize(("contribs", "steps"), [
    ([[9], [9], []], 1.0),        # one gradient of each member: one step
    ([[9, 9], [9, 9], []], 2.0),  # two of each (compute outpaced the rounds): two steps
    ([[9, 9], [6], []], 2.0),     # one dropped as too stale (4 > S=2) does not count
    ([[9, 9], [9], [9]], 1.5)])   # the outlier's (rank 2) does not count either
def test_a_round_stands_for_as_many_steps_as_its_members_took(
        contribs: list[list[int]], steps: float) -> None:
    norms = [1.0, 1.0, 900.0]
    entries = [Entry(tuple((8, v) for v in versions), norm=norms[r] if versions else None)
               for r, versions in enumerate(contribs)]
    d = decide(entries, version=10, recent=[1.0])
    assert d.steps == steps and d.total > 0


def test_every_member_takes_the_least_learning_rate_sent_per_group() -> None:
    d = decide([Entry(((8, 5),), norm=1.0, lrs=(0.1, 0.2)), Entry(lrs=(0.05, 0.3)),
                Entry(((8, 5),), norm=1.0, lrs=(0.01,))])
    assert d.lrs == [0.05, 0.2], "rank 2's single group does not match rank 0's two"
    assert decide([Entry(((8, 5),), norm=1.0), Entry(), Entry()]).lrs is None


def test_the_weight_function_is_the_callers() -> None:
    d = decide([Entry(((8, 4),), norm=1.0), Entry(), Entry()], weight=lambda s: 0.25 ** s,
               recent=[1.0])
    assert d.contributions[0].weight == 0.25 and d.adds[0].mass == 2.0


def test_reports_carry_the_refusal_codes_not_prose() -> None:
    d = decide([Entry(malformed="bad"), Entry(((8, 1),), norm=1.0),
                Entry(((8, 5),), norm=1.0)], recent=[1.0])
    result = RoundResult(0, 7, 6, None, d.contributions)
    report = report_from_round("job", MEMBERS, result)
    reasons = {c["node_id"]: c.get("reason") for c in report["contributions"]}
    assert reasons == {"a": "absent", "b": "stale", "c": None}
    assert [reported_reason(code) for code in Refusal] == [
        "stale", "nonfinite", "outlier", "other", "other", "other"]


def four(entries: list[Entry], **kwargs: object):
    return decide_round(entries, ["a", "b", "c", "d"], 5, 2, NormCheck(), **kwargs)


def test_two_colluders_of_four_are_outliers_by_history_and_by_their_own_pasts() -> None:
    """Two colluders of four sending 10^6x: half the round cannot outvote the history, nor
    the nodes' own past norms."""
    entries = [Entry(((8, 5),), norm=n) for n in (1.0, 1.1, 1e6, 1e6)]
    assert four(entries, recent=[1.0] * 32).rejected == {2: Refusal.OUTLIER,
                                                         3: Refusal.OUTLIER}
    own = {"a": [1.0] * 3, "b": [1.0] * 3, "c": [1.0] * 3, "d": [1.0] * 3}
    assert four(entries, own=own).rejected == {2: Refusal.OUTLIER, 3: Refusal.OUTLIER}
