"""The OpenAPI 3.0 description of the coordinator, served at /api/v1/openapi.json.

Every schema under `components.schemas` is derived by pydantic: request bodies from the
models the server validates with (`coordinator.models`), answers and error bodies from
`coordinator.responses`. Only paths, parameters and operation metadata are written here.
Tests check that every route is described and that real answers of a running server
match the schemas of every documented status (tests/coordinator/test_responses.py).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from coordinator.contract import JOB_PATTERN, NODE_ID_PATTERN, REQUEST_MODELS
from coordinator.responses import RESPONSE_MODELS
from coordinator.validation import openapi_schemas

VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR_TEXT = {
    400: "Malformed JSON.",
    401: "No bearer token, or a malformed Authorization header.",
    403: "The bearer token is not the one this action needs.",
    404: "No such node or job.",
    409: "Conflicts with the current state (see the message).",
    413: "The body is larger than the configured limit.",
    415: "The body is not sent as application/json.",
    422: "A field or query parameter is invalid; `error.field` names it.",
    503: "The rendezvous (etcd) cannot be reached.",
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json(_ref("Error"), _ERROR_TEXT[code]) for code in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


_STR = {"type": "string"}
_NODE_ID_PARAM = _path("node_id", {"type": "string", "pattern": NODE_ID_PATTERN})
_JOB_PARAM = _path("job", {"type": "string", "pattern": JOB_PATTERN})
_LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                "How many items (default 100; the leaderboard's is 20).")

_NODE_AUTH = [{"nodeToken": []}]
_ADMIN_AUTH = [{"adminToken": []}]

_PATHS: dict[str, Any] = {
    "/api/v1/nodes": {
        "post": {
            "operationId": "registerNode", "tags": ["nodes"],
            "summary": "Register a node and get its token",
            "description": "Needs the registration token as a bearer token when the "
                           "coordinator has one. The token is shown once; keep it.",
            "security": [{"registrationToken": []}, {}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("Registration")}}},
            "responses": {"201": _json(_ref("Registered"), "Registered."),
                          **_errors(400, 401, 403, 409, 413, 415, 422)}},
        "get": {
            "operationId": "listNodes", "tags": ["nodes"], "summary": "List nodes",
            "parameters": [_LIMIT, _query("offset", {"type": "integer", "minimum": 0,
                                                     "maximum": 10**9}, "Skip this many.")],
            "responses": {"200": _json(_ref("NodeList"), "Nodes by id."),
                          **_errors(422)}},
    },
    "/api/v1/nodes/{node_id}": {
        "get": {
            "operationId": "getNode", "tags": ["nodes"],
            "summary": "A node's credit, RAC, strikes and state",
            "parameters": [_NODE_ID_PARAM],
            "responses": {"200": _json(_ref("Node"), "The node."), **_errors(404)}},
    },
    "/api/v1/nodes/{node_id}/token": {
        "post": {
            "operationId": "rotateToken", "tags": ["nodes"],
            "summary": "Issue a new token for a node (node's token or admin token)",
            "parameters": [_NODE_ID_PARAM], "security": [{"nodeToken": []}, {"adminToken": []}],
            "responses": {"200": _json(_ref("Registered"), "The new token."),
                          **_errors(401, 403, 404)}},
    },
    "/api/v1/nodes/{node_id}/etcd-credentials": {
        "post": {
            "operationId": "issueEtcdCredentials", "tags": ["nodes"],
            "summary": "Issue the node's own etcd user and password (node's token)",
            "description": "Only when the coordinator holds an etcd identity with etcd's "
                           "root role (horderun --etcd-auth, or --etcd-admin-user); "
                           "otherwise 409 with code etcd_auth_off: the job runs without "
                           "etcd authentication. Each call replaces the password. An "
                           "evicted node gets 403.",
            "parameters": [_NODE_ID_PARAM], "security": _NODE_AUTH,
            "responses": {"200": _json(_ref("EtcdNodeCredentials"), "The credentials."),
                          **_errors(401, 403, 404, 409, 422, 503)}},
    },
    "/api/v1/nodes/{node_id}/credits": {
        "get": {
            "operationId": "creditHistory", "tags": ["credits"],
            "summary": "Rounds a node was credited for, newest first",
            "parameters": [_NODE_ID_PARAM, _LIMIT,
                           _query("before", {"type": "number", "minimum": 0,
                                             "maximum": 1e12},
                                  "Only grants before this Unix time (paging).")],
            "responses": {"200": _json(_ref("CreditHistory"), "Credit history."),
                          **_errors(404, 422)}},
    },
    "/api/v1/reports": {
        "post": {
            "operationId": "postReports", "tags": ["reports"],
            "summary": "Post a batch of round reports (the reporter's node token)",
            "description": "A 200 answer means every report in the batch is durably "
                           "handled; see each result's status. Safe to resend.",
            "security": _NODE_AUTH,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("ReportBatch")}}},
            "responses": {"200": _json(_ref("IngestResult"), "Handled."),
                          **_errors(400, 401, 403, 404, 413, 415, 422)}},
    },
    "/api/v1/credits/leaderboard": {
        "get": {
            "operationId": "leaderboard", "tags": ["credits"],
            "summary": "Nodes ranked by credit or RAC",
            "parameters": [_LIMIT, _query("order", {"type": "string",
                                                    "enum": ["credit", "rac"]},
                                          "Rank by total credit (default) or RAC.")],
            "responses": {"200": _json(_ref("Leaderboard"), "Leaderboard."),
                          **_errors(422)}},
    },
    "/api/v1/jobs": {
        "get": {"operationId": "listJobs", "tags": ["jobs"], "summary": "Jobs with reports",
                "responses": {"200": _json(_ref("JobList"), "Jobs.")}},
    },
    "/api/v1/jobs/{job}": {
        "get": {
            "operationId": "getJob", "tags": ["jobs"],
            "summary": "A job's generation, world size, rounds, samples/s and loss",
            "parameters": [_JOB_PARAM, _query("loss_points", {"type": "integer",
                                                              "minimum": 0, "maximum": 5000},
                                              "Loss points to return (default 300).")],
            "responses": {"200": _json(_ref("Job"), "The job."), **_errors(404, 422)}},
    },
    "/api/v1/jobs/{job}/timeline": {
        "get": {
            "operationId": "jobTimeline", "tags": ["jobs"],
            "summary": "Joins, departures, evictions and registrations, newest first",
            "parameters": [_JOB_PARAM, _LIMIT],
            "responses": {"200": _json(_ref("Timeline"), "Events."), **_errors(404, 422)}},
    },
    "/api/v1/jobs/{job}/manifest": {
        "get": {
            "operationId": "jobManifest", "tags": ["jobs"],
            "summary": "The volunteer job's owner-signed manifest (horde-volunteer join)",
            "parameters": [_JOB_PARAM],
            "responses": {"200": _json(_ref("Manifest"), "The signed envelope, base64 "
                                                         "fields."), **_errors(404)}},
    },
    "/api/v1/jobs/{job}/files/{name}": {
        "get": {
            "operationId": "jobFile", "tags": ["jobs"],
            "summary": "A file the job's manifest pins by SHA-256",
            "parameters": [_JOB_PARAM, _path("name", _STR)],
            "responses": {"200": {"description": "The file's bytes.", "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}},
                **_errors(404)}},
    },
    "/api/v1/status": {
        "get": {
            "operationId": "status", "tags": ["jobs"],
            "summary": "Everything the status page shows (it polls this)",
            "parameters": [_query("job", {"type": "string", "pattern": JOB_PATTERN},
                                  "Which job (default: the coordinator's, or the latest).")],
            "responses": {"200": _json(_ref("Status"), "Status."), **_errors(422)}},
    },
    "/api/v1/evictions": {
        "get": {
            "operationId": "listEvictions", "tags": ["evictions"],
            "summary": "The job's blacklist as the rendezvous holds it",
            "parameters": [_query("job", {"type": "string", "pattern": JOB_PATTERN},
                                  "Which job (default: the coordinator's).")],
            "responses": {"200": _json(_ref("EvictionList"), "Blacklist."),
                          **_errors(422, 503)}},
        "post": {
            "operationId": "evictNode", "tags": ["evictions"],
            "summary": "Evict a node (admin token)",
            "description": "Writes a blacklist entry; the leader drops the node at the "
                           "next generation and keeps it out for the cooldown.",
            "security": _ADMIN_AUTH,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("Eviction")}}},
            "responses": {"201": _json(_ref("EvictionEntry"), "Evicted."),
                          **_errors(400, 401, 403, 409, 413, 415, 422, 503)}},
    },
    "/api/v1/evictions/{node_id}": {
        "delete": {
            "operationId": "pardonNode", "tags": ["evictions"],
            "summary": "Remove a node's blacklist entry (admin token)",
            "security": _ADMIN_AUTH,
            "parameters": [_NODE_ID_PARAM, _query("job", {"type": "string",
                                                          "pattern": JOB_PATTERN},
                                                  "Which job (default: the coordinator's).")],
            "responses": {"204": {"description": "Removed."},
                          **_errors(401, 403, 404, 409, 422, 503)}},
    },
    "/api/v1/openapi.json": {
        "get": {"operationId": "openapi", "tags": ["meta"], "summary": "This description",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0 document.")}},
    },
    "/api/v1/health": {
        "get": {"operationId": "health", "tags": ["meta"],
                "summary": "Liveness: the database answers",
                "responses": {"200": _json(_ref("Health"), "Healthy.")}},
    },
    "/metrics": {
        "get": {"operationId": "metrics", "tags": ["meta"], "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text format.",
                                      "content": {"text/plain": {"schema": _STR}}}}},
    },
    "/": {
        "get": {"operationId": "statusPage", "tags": ["web"],
                "summary": "The status page (HTML; refreshes itself from /api/v1/status)",
                "parameters": [_query("job", {"type": "string", "pattern": JOB_PATTERN},
                                      "Which job.")],
                "responses": {"200": {"description": "HTML page.",
                                      "content": {"text/html": {"schema": _STR}}},
                              **_errors(422)}},
    },
}


@functools.cache
def _schemas() -> dict[str, Any]:
    """`components.schemas`, derived once per process (pydantic takes tens of ms)."""
    return openapi_schemas({**REQUEST_MODELS, **RESPONSE_MODELS})


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy each call)."""
    return copy.deepcopy({
        "openapi": "3.0.3",
        "info": {
            "title": "Horde coordinator",
            "version": VERSION,
            "description": "Credit ledger, round reports and status of Horde jobs. "
                           "See docs/coordinator.md.",
        },
        "paths": _PATHS,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "nodeToken": {"type": "http", "scheme": "bearer",
                              "description": "The token a node got at registration."},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "The coordinator's --admin-token."},
                "registrationToken": {"type": "http", "scheme": "bearer",
                                      "description": "The coordinator's "
                                                     "--registration-token, if set."},
            },
        },
    })
