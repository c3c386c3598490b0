"""Credit and quorum rules, and the cheating attempts they must defeat."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from coordinator.storage.ledger import LN2, SECONDS_PER_DAY
from tests.coordinator.helpers import (
    credit_of,
    post_reports,
    register,
    report,
)

MEMBERS3 = ["a", "b", "c"]
SAMPLES3 = {"a": 32, "b": 16, "c": 8}


@pytest.fixture
def tokens(client: FlaskClient) -> dict[str, str]:
    return {n: register(client, n) for n in ["a", "b", "c", "d", "e", "x"]}


def honest_round(client: FlaskClient, tokens: dict[str, str], rnd: int,
                 members: list[str], samples: dict[str, int], **kwargs: Any) -> None:
    for node in members:
        response = post_reports(client, node, tokens[node],
                                [report(rnd, members, samples, **kwargs)])
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["stored"] == 1


def test_three_members_each_credited_their_accepted_samples(client, tokens):
    for rnd in range(4):
        honest_round(client, tokens, rnd, MEMBERS3, SAMPLES3)
    assert {n: credit_of(client, n) for n in MEMBERS3} == {"a": 128, "b": 64, "c": 32}
    history = client.get("/api/v1/nodes/b/credits").get_json()["credits"]
    assert [h["round"] for h in history] == [3, 2, 1, 0]
    assert all(h["credit"] == 16 and h["attesters"] == 2 for h in history)


def test_credit_needs_a_quorum_of_other_reporters(client, tokens):
    # Three members: a header needs both other members (quorum 2).
    response = post_reports(client, "a", tokens["a"], [report(0, MEMBERS3, SAMPLES3)])
    assert response.get_json()["settled"] == 0
    response = post_reports(client, "b", tokens["b"], [report(0, MEMBERS3, SAMPLES3)])
    # Only c has two other reporters (a and b) so far.
    assert response.get_json()["settled"] == 1
    assert credit_of(client, "c") == 8 and credit_of(client, "a") == 0
    response = post_reports(client, "c", tokens["c"], [report(0, MEMBERS3, SAMPLES3)])
    assert response.get_json()["settled"] == 2
    assert credit_of(client, "a") == 32 and credit_of(client, "b") == 16


def test_five_members_settle_with_two_other_reporters(client, tokens):
    members = ["a", "b", "c", "d", "e"]
    samples = dict(zip(members, [10, 20, 30, 40, 50]))
    post_reports(client, "a", tokens["a"], [report(0, members, samples)])
    post_reports(client, "b", tokens["b"], [report(0, members, samples)])
    # c, d, e each have two other reporters (a, b); a and b have one each.
    assert [credit_of(client, n) for n in members] == [0, 0, 30, 40, 50]
    post_reports(client, "c", tokens["c"], [report(0, members, samples)])
    assert [credit_of(client, n) for n in members] == [10, 20, 30, 40, 50]


def test_two_member_world_needs_the_other_member(client, tokens):
    members = ["a", "b"]
    post_reports(client, "a", tokens["a"], [report(0, members, {"a": 5, "b": 7})])
    assert credit_of(client, "b") == 7 and credit_of(client, "a") == 0
    post_reports(client, "b", tokens["b"], [report(0, members, {"a": 5, "b": 7})])
    assert credit_of(client, "a") == 5


def test_own_claim_alone_earns_nothing(client, tokens):
    # A one-member round cannot be attested by anyone else.
    response = post_reports(client, "a", tokens["a"], [report(0, ["a"], {"a": 1000})])
    assert response.status_code == 200 and response.get_json()["stored"] == 1
    # Nor can a node's own reports about a multi-member round, however many rounds.
    for rnd in range(1, 5):
        post_reports(client, "a", tokens["a"], [report(rnd, MEMBERS3, SAMPLES3)])
    assert credit_of(client, "a") == 0


def test_inflated_samples_earn_nothing_extra(client, tokens):
    for rnd in range(3):
        honest_round(client, tokens, rnd, ["a", "b"], SAMPLES3)
        # c claims 10x its samples in its own report; a and b saw the truth.
        post_reports(client, "a", tokens["a"], [report(rnd, MEMBERS3, SAMPLES3,
                                                       generation=2)])
        post_reports(client, "b", tokens["b"], [report(rnd, MEMBERS3, SAMPLES3,
                                                       generation=2)])
        post_reports(client, "c", tokens["c"], [report(
            rnd, MEMBERS3, SAMPLES3, generation=2, overrides={"c": {"samples": 80}})])
    assert credit_of(client, "c") == 3 * 8
    node = client.get("/api/v1/nodes/c").get_json()
    assert node["disputes"] == 3  # each inflated report contradicted the quorum


def test_a_liar_about_others_cannot_inflate_them_either(client, tokens):
    # c reports that a trained 1000 samples; b disagrees, and a cannot vote for itself.
    post_reports(client, "c", tokens["c"], [report(0, MEMBERS3, SAMPLES3,
                                                   overrides={"a": {"samples": 1000}})])
    post_reports(client, "b", tokens["b"], [report(0, MEMBERS3, SAMPLES3)])
    post_reports(client, "a", tokens["a"], [report(0, MEMBERS3, SAMPLES3)])
    assert credit_of(client, "a") == 0  # no two others agree on a's header
    assert credit_of(client, "b") == 16 and credit_of(client, "c") == 8


def test_report_for_a_round_the_reporter_was_not_in_is_rejected(client, tokens):
    honest_round(client, tokens, 0, MEMBERS3, SAMPLES3)
    # x claims a round of a, b, c (not listing itself): rejected outright.
    response = post_reports(client, "x", tokens["x"], [report(1, MEMBERS3, SAMPLES3)])
    body = response.get_json()
    assert response.status_code == 200
    assert body["rejected"] == 1 and body["results"][0]["reason"] == "not_a_member"
    # x lists itself in generation 1, whose members a quorum already agreed on: rejected.
    members = [*MEMBERS3, "x"]
    response = post_reports(client, "x", tokens["x"], [report(
        1, members, {**SAMPLES3, "x": 500})])
    assert response.get_json()["results"][0]["reason"] == "membership_mismatch"
    assert credit_of(client, "x") == 0


def test_fabricated_round_needs_colluders_to_earn(client, tokens):
    # x invents a generation with a and b as members; a and b never report it.
    members = ["a", "b", "x"]
    for rnd in range(3):
        post_reports(client, "x", tokens["x"], [report(rnd, members, {"a": 1, "b": 1,
                                                                     "x": 999}, generation=7)])
    assert credit_of(client, "x") == 0


def test_replayed_report_is_counted_once(client, tokens):
    batch = [report(0, MEMBERS3, SAMPLES3)]
    for node in MEMBERS3:
        post_reports(client, node, tokens[node], batch)
    before = {n: credit_of(client, n) for n in MEMBERS3}
    for _ in range(3):
        for node in MEMBERS3:
            response = post_reports(client, node, tokens[node], batch)
            assert response.status_code == 200
            assert response.get_json()["duplicate"] == 1
            assert response.get_json()["credited"] == 0
    assert {n: credit_of(client, n) for n in MEMBERS3} == before


def test_duplicate_within_one_batch_and_conflicting_replay(client, tokens):
    first = report(0, MEMBERS3, SAMPLES3)
    changed = report(0, MEMBERS3, SAMPLES3, overrides={"c": {"samples": 99}})
    response = post_reports(client, "a", tokens["a"], [first, first, changed])
    assert [r["status"] for r in response.get_json()["results"]] == [
        "stored", "duplicate", "conflict"]
    response = post_reports(client, "a", tokens["a"], [changed])
    assert response.get_json()["results"][0]["status"] == "conflict"


def test_report_signed_with_another_nodes_token_is_forbidden(client, tokens):
    response = post_reports(client, "a", tokens["b"], [report(0, MEMBERS3, SAMPLES3)])
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"
    assert "does not belong to node a" in response.get_json()["error"]["message"]
    assert tokens["b"] not in response.get_data(as_text=True)
    # Nothing was stored: a's real report later is the first one.
    response = post_reports(client, "a", tokens["a"], [report(0, MEMBERS3, SAMPLES3)])
    assert response.get_json()["stored"] == 1


def test_refused_contributions_earn_nothing_and_count_strikes(client, tokens):
    refused = {"c": "nonfinite"}
    for rnd in range(2):
        honest_round(client, tokens, rnd, MEMBERS3, SAMPLES3, refused=refused)
    honest_round(client, tokens, 2, MEMBERS3, SAMPLES3, refused={"c": "stale"})
    node = client.get("/api/v1/nodes/c").get_json()
    assert node["credit"] == 0
    assert node["strikes"] == 2 and node["contributions_refused"] == 3
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'horde_rejected_contributions_total{reason="nonfinite"} 2.0' in metrics
    assert 'horde_rejected_contributions_total{reason="stale"} 1.0' in metrics


def test_mean_staleness_over_accepted_contributions(client, tokens):
    for rnd, staleness in enumerate([0, 1, 2, 1]):
        honest_round(client, tokens, rnd, MEMBERS3, SAMPLES3,
                     overrides={"b": {"staleness": staleness}})
    assert client.get("/api/v1/nodes/b").get_json()["mean_staleness"] == 1.0


def test_loss_is_averaged_per_round(client, tokens):
    for rnd in range(3):
        for i, node in enumerate(MEMBERS3):
            post_reports(client, node, tokens[node],
                         [report(rnd, MEMBERS3, SAMPLES3, loss=1.0 + rnd + i)])
    job = client.get("/api/v1/jobs/job1").get_json()
    assert [p["loss"] for p in job["loss"]] == [2.0, 3.0, 4.0]
    assert job["rounds"] == 3 and job["world_size"] == 3 and job["generation"] == 1


@pytest.fixture
def timed(make_app: Callable[..., Flask], clock) -> tuple[FlaskClient, Any]:
    app = make_app(clock=clock, half_life_days=1.0)
    client = app.test_client()
    return client, clock


def test_rac_decays_with_the_half_life(timed):
    client, clock = timed
    tokens = {n: register(client, n) for n in MEMBERS3}
    honest_round(client, tokens, 0, MEMBERS3, SAMPLES3)
    rac = client.get("/api/v1/nodes/a").get_json()["rac"]
    assert rac == pytest.approx(32 * LN2 * SECONDS_PER_DAY / SECONDS_PER_DAY, rel=1e-6)
    clock.advance(SECONDS_PER_DAY)  # one half-life
    assert client.get("/api/v1/nodes/a").get_json()["rac"] == pytest.approx(rac / 2, rel=1e-6)
    clock.advance(2 * SECONDS_PER_DAY)
    assert client.get("/api/v1/nodes/a").get_json()["rac"] == pytest.approx(rac / 8, rel=1e-6)
    # The total never decays.
    assert credit_of(client, "a") == 32


def test_rac_converges_to_the_daily_rate(timed):
    client, clock = timed
    tokens = {n: register(client, n) for n in MEMBERS3}
    # a earns 32 credits per round, one round per hour, for ten half-lives (days).
    for rnd in range(24 * 10):
        honest_round(client, tokens, rnd, MEMBERS3, SAMPLES3)
        clock.advance(3600)
    rac = client.get("/api/v1/nodes/a").get_json()["rac"]
    assert rac == pytest.approx(32 * 24, rel=0.03)
    board = client.get("/api/v1/credits/leaderboard?order=rac").get_json()["entries"]
    assert [e["node_id"] for e in board[:3]] == ["a", "b", "c"]
    assert math.isclose(board[0]["rac"], rac)


def test_a_span_of_rounds_is_credited_once_with_its_summed_samples(client, tokens):
    # Synchronous steps 0-15 reported together, then 16-31, then step 32 alone.
    summed = {n: 16 * s for n, s in SAMPLES3.items()}
    honest_round(client, tokens, 0, MEMBERS3, summed, span=16)
    honest_round(client, tokens, 16, MEMBERS3, summed, span=16)
    honest_round(client, tokens, 32, MEMBERS3, SAMPLES3)
    assert {n: credit_of(client, n) for n in MEMBERS3} == {"a": 33 * 32, "b": 33 * 16,
                                                          "c": 33 * 8}
    history = client.get("/api/v1/nodes/c/credits").get_json()["credits"]
    assert [(h["round"], h["span"], h["credit"]) for h in history] == [
        (32, 1, 8), (16, 16, 128), (0, 16, 128)]
    job = client.get("/api/v1/jobs/job1").get_json()
    assert job["rounds"] == 33
    leaderboard = client.get("/api/v1/credits/leaderboard").get_json()["entries"]
    assert {e["node_id"]: e["rounds"] for e in leaderboard if e["node_id"] in MEMBERS3} == {
        "a": 33, "b": 33, "c": 33}


def test_reports_of_different_spans_do_not_attest_each_other(client, tokens):
    # a and b closed the span 0-15; c's generation ended before it knew that, so it
    # reported the same rounds one by one. Neither view has a quorum for anyone (quorum 2).
    summed = {n: 16 * s for n, s in SAMPLES3.items()}
    for node in ("a", "b"):
        post_reports(client, node, tokens[node], [report(0, MEMBERS3, summed, span=16)])
    response = post_reports(client, "c", tokens["c"],
                            [report(r, MEMBERS3, SAMPLES3) for r in range(16)])
    assert response.get_json()["stored"] == 16
    # c is attested by a and b for the span; a and b have no second attester.
    assert {n: credit_of(client, n) for n in MEMBERS3} == {"a": 0, "b": 0, "c": 16 * 8}
    # The honest one-by-one reporter is not marked as disputing the span.
    assert client.get("/api/v1/nodes/c").get_json()["disputes"] == 0


def test_span_is_part_of_what_a_replay_must_match(client, tokens):
    summed = {n: 4 * s for n, s in SAMPLES3.items()}
    first = post_reports(client, "a", tokens["a"], [report(0, MEMBERS3, summed, span=4)])
    assert first.get_json()["stored"] == 1
    again = post_reports(client, "a", tokens["a"], [report(0, MEMBERS3, summed, span=4)])
    assert again.get_json()["duplicate"] == 1
    other = post_reports(client, "a", tokens["a"], [report(0, MEMBERS3, summed, span=8)])
    assert other.get_json()["conflict"] == 1


@pytest.mark.parametrize("span", [0, -1, 10**6 + 1, 1.5, "16", True])
def test_a_bad_span_is_refused_naming_the_field(client, tokens, span):
    response = post_reports(client, "a", tokens["a"], [report(0, MEMBERS3, SAMPLES3,
                                                              span=span)])
    assert response.status_code == 422
    assert response.get_json()["error"]["field"] == "reports[0].span"
