"""Every bad input gets a precise 4xx with a JSON error body, never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.coordinator.helpers import (
    ADMIN_TOKEN,
    auth,
    contribution,
    post_raw,
    post_reports,
    register,
    report,
)

MEMBERS = ["a", "b", "c"]
SAMPLES = {"a": 1, "b": 2, "c": 3}


@pytest.fixture
def token(client: FlaskClient) -> str:
    for node in ("b", "c"):
        register(client, node)
    return register(client, "a")


def error_of(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert body is not None, response.get_data(as_text=True)[:200]
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def batch(**report_overrides: Any) -> dict[str, Any]:
    rep = report(0, MEMBERS, SAMPLES)
    rep.update(report_overrides)
    return {"node_id": "a", "reports": [rep]}


def with_contribution(**fields: Any) -> dict[str, Any]:
    body = batch()
    body["reports"][0]["contributions"][0].update(fields)
    return body


INVALID_BATCHES = [
    ("samples as string", with_contribution(samples="12"),
     "reports[0].contributions[0].samples"),
    ("samples as bool", with_contribution(samples=True), "reports[0].contributions[0].samples"),
    ("negative samples", with_contribution(samples=-1), "reports[0].contributions[0].samples"),
    ("samples too large", with_contribution(samples=10**12),
     "reports[0].contributions[0].samples"),
    ("fractional staleness", with_contribution(staleness=0.5),
     "reports[0].contributions[0].staleness"),
    ("accepted as int", with_contribution(accepted=1), "reports[0].contributions[0].accepted"),
    ("unknown reason", with_contribution(accepted=False, reason="bored"),
     "reports[0].contributions[0].reason"),
    ("reason with accepted", with_contribution(reason="stale"),
     "reports[0].contributions[0].reason"),
    ("refused without reason", with_contribution(accepted=False),
     "reports[0].contributions[0].reason"),
    ("extra field", with_contribution(bonus=1), "reports[0].contributions[0].bonus"),
    ("generation negative", batch(generation=-1), "reports[0].generation"),
    ("round beyond 2**53", batch(round=2**53), "reports[0].round"),
    ("job with slash", batch(job="a/b"), "reports[0].job"),
    ("members not a list", batch(members="a,b,c"), "reports[0].members"),
    ("members repeated", batch(members=["a", "a", "b"]), "reports[0].members[1]"),
    ("bad node id", batch(members=["a", "b", "c d"]), "reports[0].members[2]"),
    ("header missing for a member",
     batch(contributions=[contribution("a", 1), contribution("b", 2)]),
     "reports[0].contributions"),
    ("header for a non-member",
     batch(contributions=[contribution("a", 1), contribution("b", 2), contribution("z", 3)]),
     "reports[0].contributions"),
    ("two headers for one member",
     batch(contributions=[contribution("a", 1), contribution("a", 2), contribution("c", 3)]),
     "reports[0].contributions[1].node_id"),
    ("loss as string", batch(loss="0.3"), "reports[0].loss"),
    ("no reports", {"node_id": "a", "reports": []}, "reports"),
    ("no node id", {"reports": [report(0, MEMBERS, SAMPLES)]}, "node_id"),
    ("body is a list", [report(0, MEMBERS, SAMPLES)], None),
    ("too many reports", {"node_id": "a", "reports": [report(i, MEMBERS, SAMPLES)
                                                      for i in range(1001)]}, "reports"),
]


@pytest.mark.parametrize("name,body,field", INVALID_BATCHES, ids=[c[0] for c in INVALID_BATCHES])
def test_invalid_report_batches_get_422_naming_the_field(client, token, name, body, field):
    response = client.post("/api/v1/reports", json=body, headers=auth(token))
    assert response.status_code == 422, response.get_json()
    error = error_of(response)
    assert error["code"] == "invalid"
    assert error.get("field") == field


MALFORMED = [
    ("truncated", b'{"node_id": "a", "reports": ['),
    ("not json", b"hello"),
    ("NaN literal", b'{"node_id": "a", "reports": [{"loss": NaN}]}'),
    ("Infinity literal", b'{"x": Infinity}'),
    ("invalid utf-8", b'{"node_id": "\xff\xfe"}'),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
    ("huge integer", b'{"n": ' + b"9" * 5000 + b"}"),
    ("empty body", b""),
]


@pytest.mark.parametrize("name,data", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_json_gets_400(client, token, name, data):
    response = post_raw(client, "/api/v1/reports", data, token)
    assert response.status_code == 400
    assert error_of(response)["code"] == "malformed_json"


def test_wrong_content_type_gets_415(client, token):
    response = post_raw(client, "/api/v1/reports", json.dumps(batch()), token,
                        content_type="text/plain")
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"
    response = client.post("/api/v1/nodes", data={"node_id": "q"})  # a form post
    assert response.status_code == 415


def test_huge_body_gets_413(client, token):
    data = b'{"node_id": "a", "reports": [' + b" " * (5 * 1024 * 1024) + b"]}"
    response = post_raw(client, "/api/v1/reports", data, token)
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"


def test_lone_surrogate_is_refused(client):
    data = b'{"node_id": "q", "display_name": "\\ud800x"}'
    response = post_raw(client, "/api/v1/nodes", data)
    assert response.status_code == 422
    assert error_of(response)["field"] == "display_name"
    data = b'{"node_id": "q", "hardware": {"\\udfff": 1}}'
    assert post_raw(client, "/api/v1/nodes", data).status_code == 422


def test_auth_errors(client, token):
    body = batch()
    response = client.post("/api/v1/reports", json=body)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert error_of(response)["code"] == "unauthorized"
    response = client.post("/api/v1/reports", json=body, headers={"Authorization": "Basic eA=="})
    assert response.status_code == 401
    response = client.post("/api/v1/reports", json=body, headers=auth("hrd_not-a-real-token"))
    assert response.status_code == 403
    assert error_of(response)["code"] == "forbidden"


def test_unknown_node_gets_404(client, token):
    body = batch()
    body["node_id"] = "stranger"
    response = client.post("/api/v1/reports", json=body, headers=auth(token))
    assert response.status_code == 404
    assert "stranger is not registered" in error_of(response)["message"]
    assert client.get("/api/v1/nodes/stranger").status_code == 404
    assert client.get("/api/v1/nodes/bad%20id").status_code == 404
    assert client.get("/api/v1/nodes/stranger/credits").status_code == 404
    assert client.post("/api/v1/nodes/stranger/token", headers=auth(token)).status_code == 404
    assert client.get("/api/v1/jobs/nojob").status_code == 404
    assert client.get("/api/v1/jobs/nojob/timeline").status_code == 404


def test_registration_rules(client):
    assert client.post("/api/v1/nodes", json={"node_id": "n1"}).status_code == 201
    response = client.post("/api/v1/nodes", json={"node_id": "n1"})
    assert response.status_code == 409 and error_of(response)["code"] == "conflict"
    for bad in ({"node_id": ""}, {"node_id": "-lead"}, {"node_id": "x" * 129},
                {"node_id": 5}, {}, {"node_id": "n2", "display_name": "x" * 65},
                {"node_id": "n2", "display_name": "line\nbreak"},
                {"node_id": "n2", "hardware": {"gpu": ["a"]}},
                {"node_id": "n2", "hardware": {f"k{i}": 1 for i in range(33)}},
                {"node_id": "n2", "token": "mine"}):
        response = client.post("/api/v1/nodes", json=bad)
        assert response.status_code == 422, bad
        assert error_of(response)["code"] == "invalid"


def test_registration_token_gates_registration(make_app):
    client = make_app(registration_token="registration-secret-123").test_client()
    assert client.post("/api/v1/nodes", json={"node_id": "n1"}).status_code == 401
    response = client.post("/api/v1/nodes", json={"node_id": "n1"}, headers=auth("wrong" * 4))
    assert response.status_code == 403
    response = client.post("/api/v1/nodes", json={"node_id": "n1"},
                           headers=auth("registration-secret-123"))
    assert response.status_code == 201


def test_token_rotation_revokes_the_old_token(client, token):
    response = client.post("/api/v1/nodes/a/token", headers=auth(token))
    assert response.status_code == 200
    new = response.get_json()["token"]
    assert post_reports(client, "a", token, [report(0, MEMBERS, SAMPLES)]).status_code == 403
    assert post_reports(client, "a", new, [report(0, MEMBERS, SAMPLES)]).status_code == 200
    # The operator can reissue it too; another node cannot.
    other = register(client, "z")
    assert client.post("/api/v1/nodes/a/token", headers=auth(other)).status_code == 403
    assert client.post("/api/v1/nodes/a/token", headers=auth(ADMIN_TOKEN)).status_code == 200
    assert client.post("/api/v1/nodes/a/token").status_code == 401


@pytest.mark.parametrize("url", [
    "/api/v1/nodes?limit=0", "/api/v1/nodes?limit=abc", "/api/v1/nodes?offset=-1",
    "/api/v1/credits/leaderboard?order=best", "/api/v1/credits/leaderboard?limit=5000",
    "/api/v1/nodes/a/credits?before=nan", "/api/v1/status?job=a%2Fb", "/?job=%00",
])
def test_bad_query_parameters_get_422(client, token, url):
    response = client.get(url)
    assert response.status_code == 422
    assert error_of(response)["field"].startswith("query.")


def test_wrong_method_and_unknown_path(client):
    response = client.delete("/api/v1/reports")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_evictions_need_admin_and_a_rendezvous(make_app, client):
    response = client.post("/api/v1/evictions", json={"node_id": "a"})
    assert response.status_code == 401
    response = client.post("/api/v1/evictions", json={"node_id": "a"}, headers=auth("x" * 20))
    assert response.status_code == 403
    response = client.post("/api/v1/evictions", json={"node_id": "a"},
                           headers=auth(ADMIN_TOKEN))
    assert response.status_code == 409
    assert "no rendezvous" in error_of(response)["message"]
    no_admin = make_app(admin_token=None).test_client()
    response = no_admin.post("/api/v1/evictions", json={"node_id": "a"},
                             headers=auth(ADMIN_TOKEN))
    assert response.status_code == 403
    assert "disabled" in error_of(response)["message"]
