"""Property tests of the ledger (hypothesis): whatever the order, batching, replays and
one dishonest member do, nobody earns more than its true accepted samples, the ledger
equals its grants, and every grant is backed by a quorum of other members."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema_rs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError as PydanticError
from sqlalchemy import select

from coordinator import create_app
from coordinator.contract import REQUEST_MODELS, ReportBatch, parse_batch
from coordinator.errors import ValidationError
from coordinator.state import EXTENSION
from coordinator.storage.models import credits, nodes, reports
from coordinator.validation import adapter, openapi_schemas
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


_PUBLISHED = jsonschema_rs.validator_for({
    "$ref": "#/components/schemas/ReportBatch",
    "components": {"schemas": openapi_schemas(REQUEST_MODELS)}})


def _enforced(body: Any) -> bool:
    """Whether the server's models accept `body` (the schema-level rules: the cross-field
    rules of parse_batch other than unique members are not in a JSON Schema)."""
    try:
        batch = adapter(ReportBatch).validate_json(json.dumps(body))
    except PydanticError:
        return False
    try:
        parse_batch(batch)
    except ValidationError as exc:
        return ".members[" not in (exc.field or "")
    return True


@settings(max_examples=1500, deadline=None, database=None, derandomize=True)
@given(body=mutated_batches())
def test_the_server_never_accepts_what_the_published_schema_refuses(body):
    """The OpenAPI schema is derived from the models; whatever a body holds, the models
    accept it only if the published schema does, and refuse what it refuses (except
    integral floats such as 1.0 for integers: JSON Schema counts them as integers, the
    strict models refuse them)."""
    published = _PUBLISHED.is_valid(body)
    if _enforced(body):
        assert published, body
    elif published:
        assert _integral_float_in(body), body


def _integral_float_in(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_integral_float_in(v) for v in value.values())
    if isinstance(value, list):
        return any(_integral_float_in(v) for v in value)
    return False


def test_plain_batches_are_valid_for_both():
    members = POOL[:3]
    body = {"node_id": "n0", "reports": [
        report(r, members, {m: 3 for m in members}, loss=0.5, refused={"n1": "stale"})
        for r in range(3)]}
    assert _enforced(body) and _PUBLISHED.is_valid(body)
