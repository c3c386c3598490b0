"""The OpenAPI description is complete and true: every route is in it, and schemathesis
finds no 5xx and no answer that differs from what is described."""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator import create_app
from coordinator.contract import REQUEST_MODELS
from coordinator.openapi import openapi_document
from coordinator.state import EXTENSION
from coordinator.validation import openapi_schemas
from rendezvous.memory import MemoryBackend
from tests.coordinator.helpers import ADMIN_TOKEN, auth, make_config, post_reports, register, report

FUZZ_EXAMPLES = 25  # per operation and mode; the whole run stays well under a minute
FUZZ_BODY_EXAMPLES = 80  # for operations that take a JSON body


def _described(spec: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}


def test_every_route_is_described(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    routes = set()
    for rule in client.application.url_map.iter_rules():
        if rule.endpoint.endswith("static"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method))
    assert routes == _described(spec)


def test_request_schemas_are_the_enforced_ones(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    derived = openapi_schemas(REQUEST_MODELS)
    assert set(REQUEST_MODELS) <= set(derived)
    for name, schema in derived.items():
        assert spec["components"]["schemas"][name] == schema


def test_static_assets_ship_with_the_package(client):
    for name in ("status.js", "status.css"):
        response = client.get(f"/static/coordinator/{name}")
        assert response.status_code == 200 and len(response.data) > 500
    page = client.get("/").get_data(as_text=True)
    assert "http://" not in page.replace("http://www.w3.org", "")
    assert "https://" not in page


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory):
    backend = MemoryBackend()
    app = create_app(make_config(tmp_path_factory.mktemp("fuzz"), job="job1"),
                     backend=backend)
    client = app.test_client()
    tokens = {n: register(client, n) for n in ("fuzz-a", "fuzz-b", "fuzz-c")}
    members = list(tokens)
    for node, token in tokens.items():
        post_reports(client, node, token, [report(r, members, {m: 8 for m in members},
                                                  loss=1.0 / (r + 1)) for r in range(3)])
    app.config["FUZZ_TOKENS"] = tokens
    yield app
    app.extensions[EXTENSION].close()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_app)


OPERATIONS = sorted(_described(openapi_document()))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


def _has_inputs(path: str, method: str) -> bool:
    operation = openapi_document()["paths"][path][method.lower()]
    return bool(operation.get("parameters") or operation.get("requestBody"))


CASES = [(path, method, mode) for path, method in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode == GenerationMode.POSITIVE or _has_inputs(path, method)]


@pytest.mark.parametrize("path,method,mode", CASES, ids=[
    f"{m} {p} {'valid' if mode == GenerationMode.POSITIVE else 'invalid'}"
    for p, m, mode in CASES])
def test_api_answers_as_described(api_schema, fuzz_app, path, method, mode):
    operation = api_schema[path][method]
    if path == "/api/v1/reports":
        headers = auth(fuzz_app.config["FUZZ_TOKENS"]["fuzz-a"])
    elif path.startswith("/api/v1/evictions") or path.endswith("/token"):
        headers = auth(ADMIN_TOKEN)
    else:
        headers = {}

    examples = FUZZ_BODY_EXAMPLES if operation.body else FUZZ_EXAMPLES

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


def test_fuzzing_left_the_ledger_consistent(fuzz_app, api_schema):
    """After the fuzz run the seeded nodes still hold exactly their attested credit."""
    client = fuzz_app.test_client()
    credits = {n: client.get(f"/api/v1/nodes/{n}").get_json()["credit"]
               for n in ("fuzz-a", "fuzz-b", "fuzz-c")}
    assert credits == {"fuzz-a": 24, "fuzz-b": 24, "fuzz-c": 24}


def test_openapi_document_loads_without_errors(client):
    # schemathesis parses every operation (it skips the document's own path).
    loaded = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", client.application)
    operations = [result.ok() for result in loaded.get_all_operations()]
    found = {(op.path, op.method.upper()) for op in operations}
    described = _described(client.get("/api/v1/openapi.json").get_json())
    assert found == described - {("/api/v1/openapi.json", "GET")}
