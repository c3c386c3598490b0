"""Builders for coordinator tests: configs, registrations, honest and dishonest reports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from pydantic import ValidationError

from coordinator import CoordinatorConfig
from coordinator.openapi import openapi_document
from coordinator.responses import RESPONSE_MODELS
from coordinator.validation import adapter

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
JOB = "job1"


def make_config(tmp_path: Path, **overrides: Any) -> CoordinatorConfig:
    # These tests exercise the quorum rules without a rendezvous, so they let a quorum of
    # reports establish a generation; tests/security checks the default (rendezvous only).
    params: dict[str, Any] = {"db_url": f"sqlite:///{tmp_path / 'ledger.db'}",
                              "admin_token": ADMIN_TOKEN, "watch_rendezvous": False,
                              "trust_reported_membership": True}
    params.update(overrides)
    return CoordinatorConfig(**params)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(client: Any, node_id: str, **extra: Any) -> str:
    """Register `node_id` through the API; returns its token."""
    response = client.post("/api/v1/nodes", json={"node_id": node_id, **extra})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["token"]


def contribution(node_id: str, samples: int, *, staleness: int = 0, version: int = 0,
                 accepted: bool = True, reason: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"node_id": node_id, "samples": samples, "staleness": staleness,
                           "param_version": version, "accepted": accepted}
    if reason is not None:
        out["reason"] = reason
    return out


def report(rnd: int, members: list[str], samples: Mapping[str, int], *,
           generation: int = 1, job: str = JOB, loss: float | None = None,
           refused: Mapping[str, str] | None = None,
           overrides: Mapping[str, Mapping[str, Any]] | None = None,
           span: int | None = None) -> dict[str, Any]:
    """One reporter's view of a round: every member's header (honest unless overridden)."""
    refused = refused or {}
    contributions = []
    for node in members:
        c = contribution(node, samples[node], version=rnd, accepted=node not in refused,
                         reason=refused.get(node))
        c.update((overrides or {}).get(node, {}))
        contributions.append(c)
    out: dict[str, Any] = {"job": job, "generation": generation, "round": rnd,
                           "members": list(members), "contributions": contributions}
    if loss is not None:
        out["loss"] = loss
    if span is not None:
        out["span"] = span
    return out


def post_reports(client: Any, node_id: str, token: str, reports: Iterable[dict[str, Any]]
                 ) -> Any:
    return client.post("/api/v1/reports", json={"node_id": node_id, "reports": list(reports)},
                       headers=auth(token))


def post_raw(client: Any, path: str, data: bytes | str, token: str | None = None,
             content_type: str = "application/json") -> Any:
    headers = auth(token) if token else {}
    return client.post(path, data=data, headers=headers, content_type=content_type)


def credit_of(client: Any, node_id: str) -> int:
    response = client.get(f"/api/v1/nodes/{node_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["credit"]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


_RULE_PARAM = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


def check_answers(app: Flask) -> list[str]:
    """Validate every JSON answer of `app` against its documented response model; returns
    the list the problems are collected in (empty while answers match their models)."""
    paths = openapi_document()["paths"]
    problems: list[str] = []

    @app.after_request
    def _check(response: Response) -> Response:
        rule = request.url_rule
        if rule is None or response.mimetype != "application/json":
            return response  # no route (Werkzeug's 404/405), or not a JSON answer
        path = _RULE_PARAM.sub(r"{\1}", rule.rule)
        where = f"{request.method} {path} {response.status_code}"
        operation = paths.get(path, {}).get(request.method.lower())
        described = (operation or {}).get("responses", {}).get(str(response.status_code))
        if described is None:
            problems.append(f"{where}: status not documented")
            return response
        ref = described["content"]["application/json"]["schema"].get("$ref")
        if ref is None:
            return response  # the OpenAPI document itself
        model = RESPONSE_MODELS[ref.rsplit("/", 1)[1]]
        try:
            adapter(model).validate_json(response.get_data(), strict=True)
        except ValidationError as exc:
            problems.append(f"{where}: {exc}")
        return response

    return problems
