"""Property tests of the ledger (hypothesis): whatever the order, batching, replays and
one dishonest member do, nobody earns more than its true accepted samples, the ledger
equals its grants, and every grant is backed by a quorum of other members."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from coordinator import create_app
from coordinator.contract import _plainly_valid, validate_batch
from coordinator.state import EXTENSION
from coordinator.storage.models import credits, nodes, reports
from tests.coordinator.helpers import make_config, post_reports, register, report

POOL = [f"n{i}" for i in range(6)]
ROUNDS = 4


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    world = draw(st.sampled_from([3, 5]))
    members = POOL[:world]
    liar = draw(st.one_of(st.none(), st.sampled_from(members)))
    truth = {(rnd, node): (draw(st.integers(0, 64)), draw(st.booleans()))
             for rnd in range(ROUNDS) for node in members}
    posts = []
    for rnd in range(ROUNDS):
        samples = {n: truth[(rnd, n)][0] for n in members}
        refused = {n: "stale" for n in members if not truth[(rnd, n)][1]}
        for reporter in members:
            if not draw(st.booleans()) and reporter != liar and draw(st.booleans()):
                continue  # an honest member that never reports this round
            overrides: dict[str, dict[str, Any]] = {}
            listed = members
            if reporter == liar:
                trick = draw(st.sampled_from(["inflate", "slander", "boost", "outsider"]))
                other = draw(st.sampled_from([m for m in members if m != liar]))
                if trick == "inflate":
                    overrides[liar] = {"samples": samples[liar] + 1000, "accepted": True}
                    overrides[liar]["reason"] = None
                elif trick == "slander":
                    overrides[other] = {"samples": 0, "accepted": False, "reason": "nonfinite"}
                elif trick == "boost":
                    overrides[other] = {"samples": samples[other] + 500, "accepted": True,
                                        "reason": None}
                else:
                    listed = [*members, POOL[-1]]
            rep = report(rnd, listed, {**samples, POOL[-1]: 999}, refused=refused,
                         overrides=overrides)
            for c in rep["contributions"]:
                if c.get("reason", "x") is None:
                    del c["reason"]
            posts.append((reporter, rep))
    order = draw(st.permutations(range(len(posts))))
    replays = draw(st.lists(st.sampled_from(range(len(posts))), max_size=6))
    batch_size = draw(st.integers(1, 5))
    return {"members": members, "liar": liar, "truth": truth, "posts": posts,
            "order": [*order, *replays], "batch_size": batch_size}


def _true_credit(truth: dict, node: str) -> int:
    return sum(s for (rnd, n), (s, ok) in truth.items() if n == node and ok)


@settings(max_examples=30, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(scenario=scenarios())
def test_ledger_invariants(scenario):
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(make_config(Path(tmp)))
        try:
            _check(app, scenario)
        finally:
            app.extensions[EXTENSION].close()


def _check(app: Any, sc: dict[str, Any]) -> None:
    client = app.test_client()
    tokens = {n: register(client, n) for n in POOL}
    posts, size = sc["posts"], sc["batch_size"]
    by_reporter: dict[str, list[dict]] = {}
    for index in sc["order"]:
        reporter, rep = posts[index]
        queue = by_reporter.setdefault(reporter, [])
        queue.append(rep)
        if len(queue) >= size:
            assert post_reports(client, reporter, tokens[reporter], queue).status_code == 200
            queue.clear()
    for reporter, queue in by_reporter.items():
        if queue:
            assert post_reports(client, reporter, tokens[reporter], queue).status_code == 200

    st_ = app.extensions[EXTENSION]
    with st_.storage.read() as conn:
        ledger = {r.node_id: r.credit_total for r in conn.execute(select(nodes))}
        grants = list(conn.execute(select(credits)))
        stored = list(conn.execute(select(reports)))
    # The ledger is exactly the sum of its grants.
    granted = Counter()
    for g in grants:
        granted[g.node_id] += g.credit
    assert {n: ledger[n] for n in POOL} == {n: granted.get(n, 0) for n in POOL}
    # Every grant is backed by enough other members' identical reports.
    members = sc["members"]
    needed = min(2, len(members) - 1)
    for g in grants:
        header = [g.node_id, g.samples, g.staleness, g.param_version, g.accepted, g.reason]
        backers = [r for r in stored if r.round == g.round and r.reporter != g.node_id
                   and json.loads(r.members) == members
                   and header in json.loads(r.headers)]
        assert len(backers) >= needed, (g, backers)
    # Nobody earns more than its true accepted samples; with five members and all
    # reports in, everybody earns exactly that despite one liar.
    truth = sc["truth"]
    for node in members:
        assert ledger[node] <= _true_credit(truth, node), node
    assert ledger[POOL[-1]] == 0 or POOL[-1] in members
    reported_all = all(any(r == m and p["round"] == rnd for r, p in posts)
                       for m in members for rnd in range(ROUNDS))
    if len(members) == 5 and reported_all:
        for node in members:
            assert ledger[node] == _true_credit(truth, node), node
    # Replaying everything changes nothing.
    for reporter, rep in posts:
        body = post_reports(client, reporter, tokens[reporter], [rep]).get_json()
        assert body["stored"] == 0 and body["credited"] == 0
    with st_.storage.read() as conn:
        assert {r.node_id: r.credit_total for r in conn.execute(select(nodes))} == ledger


_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(2**53 - 2, 2**53 + 2),
    st.integers(10**9 - 1, 10**9 + 1), st.floats(allow_nan=False), st.just(1.0),
    st.just(float("inf")), st.text(max_size=3), st.sampled_from(["n0", "n1", "ü", "a b",
                                                                 "stale", "bogus", "n0\n"]),
    st.sampled_from([[], ["n0"], ["n0", "n0", "n1"], ["n0", "n1", "n2"], ["n0", "n1", 5],
                     ["n0", "n1", "n3"]]),
    st.dictionaries(st.just("k"), st.just(1)))


@st.composite
def mutated_batches(draw: Any) -> dict[str, Any]:
    members = POOL[:3]
    body = {"node_id": "n0", "reports": [
        report(r, members, {m: 3 for m in members}, loss=0.5) for r in range(2)]}
    objects = [body, *body["reports"], *body["reports"][0]["contributions"]]
    for _ in range(draw(st.integers(0, 3))):
        obj = draw(st.sampled_from(objects))
        keys = [*obj.keys(), "extra"]
        key = draw(st.sampled_from(["members", *keys] if "members" in obj else keys))
        if draw(st.booleans()) and key in obj:
            del obj[key]
        else:
            obj[key] = draw(_FIELD_VALUES)
    return body


@settings(max_examples=1500, deadline=None, database=None, derandomize=True)
@given(body=mutated_batches())
def test_fast_validation_never_accepts_what_the_schema_refuses(body):
    """`contract._plainly_valid` is a shortcut: it may send a valid batch to the general
    validator, but must never accept one the published schema refuses."""
    if _plainly_valid(body):
        validate_batch(body, "")  # must not raise


def test_fast_validation_takes_plain_batches():
    members = POOL[:3]
    body = {"node_id": "n0", "reports": [
        report(r, members, {m: 3 for m in members}, loss=0.5, refused={"n1": "stale"})
        for r in range(3)]}
    assert _plainly_valid(body)
