"""Every documented answer of every route, from a running coordinator, matches its schema.

Three `horde-coordinator serve` processes answer over real HTTP: one reading a real etcd
(with a registration token and a signed-manifest folder), one without a rendezvous (the
409s of evictions) and one whose rendezvous is down (the 503s). The test provokes every
status the served OpenAPI document lists for every operation, validates each body against
the schema the document gives for that status and content type (JSON Schema by
`jsonschema_rs`, the document's `nullable` read as OpenAPI 3.0 means it), and fails
when an answer has a status the document does not list or a listed status was never seen.
The schemas are pydantic's (`coordinator.responses`), so models and answers cannot drift.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from coordinator.responses import RESPONSE_MODELS
from coordinator.validation import openapi_schemas
from rendezvous.embedded import EmbeddedEtcd, free_port
from tests.coordinator.helpers import ADMIN_TOKEN, JOB, report
from tests.coordinator.serverproc import ServerProcess

REGISTRATION_TOKEN = "registration-token-for-tests-0123"
MAX_BODY = 16384
TOO_BIG = b'{"node_id": "' + b"x" * (MAX_BODY + 10) + b'"}'
MANIFEST_FILE = "train.py"


def to_json_schema(node: Any) -> Any:
    """An OpenAPI 3.0 schema object as plain JSON Schema: `nullable: true` admits null."""
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


class Api:
    """Real HTTP to the coordinators; checks and records each answer against the spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.components = to_json_schema(spec["components"])
        self.seen: set[tuple[str, str, str]] = set()
        self.templates = [(re.compile("^" + re.sub(r"\{[a-z_]+\}", "[^/]+", p) + "$"), p)
                          for p in spec["paths"]]

    def operation(self, path: str, method: str) -> tuple[str, dict[str, Any]]:
        bare = path.split("?", 1)[0]
        matches = [t for rx, t in self.templates if rx.match(bare)]
        # the most literal template wins (/nodes/{node_id}/token over /nodes/{node_id})
        template = min(matches, key=lambda t: t.count("{"))
        return template, self.spec["paths"][template][method.lower()]

    def call(self, url: str, method: str, path: str, *, body: bytes | None = None,
             json_body: Any = None, token: str | None = None,
             content_type: str = "application/json", expect: int) -> Any:
        """Send, check the status is `expect` and documented and the body matches its
        schema; returns the decoded JSON (or the raw bytes)."""
        headers = {}
        if json_body is not None:
            body = json.dumps(json_body).encode()
        if body is not None:
            headers["Content-Type"] = content_type
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        host, port = url.split("//", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            status, media = response.status, response.getheader("Content-Type", "")
        finally:
            conn.close()
        assert status == expect, (method, path, status, data[:300])
        template, operation = self.operation(path, method)
        described = operation["responses"].get(str(status))
        assert described is not None, f"{method} {template} answered {status}, not documented"
        self.seen.add((template, method.upper(), str(status)))
        content = described.get("content")
        if not content:
            assert data == b"", f"{method} {template} {status} has an undocumented body"
            return None
        media_type = media.split(";", 1)[0].strip()
        assert media_type in content, (method, template, status, media_type, list(content))
        if media_type != "application/json":
            return data
        value = json.loads(data)
        schema = {**to_json_schema(content[media_type]["schema"]),
                  "components": self.components}
        errors = [f"{e.message} at {'/'.join(map(str, e.instance_path))}"
                  for e in jsonschema_rs.Draft7Validator(schema).iter_errors(value)]
        assert not errors, f"{method} {template} {status}: {errors[:5]}"
        return value


def write_manifest(folder: Path) -> None:
    """A job folder as `horde-volunteer manifest sign` leaves it (the coordinator serves
    the envelope as it is; clients verify the signature)."""
    folder.mkdir()
    script = b"print('train')\n"
    (folder / MANIFEST_FILE).write_bytes(script)
    manifest = {"job": JOB, "files": {MANIFEST_FILE: hashlib.sha256(script).hexdigest()}}
    envelope = {"manifest": base64.b64encode(json.dumps(manifest).encode()).decode(),
                "signature": base64.b64encode(b"s" * 64).decode(),
                "public_key": base64.b64encode(b"k" * 32).decode()}
    (folder / "manifest.signed.json").write_text(json.dumps(envelope))


@pytest.fixture(scope="module")
def servers(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("responses")
    write_manifest(root / "manifest")
    common = ("--job", JOB, "--max-body-bytes", str(MAX_BODY))
    # a second etcd with auth on: the "auth" coordinator holds its root identity and
    # issues per-node etcd credentials; "dead" has an admin identity but no etcd
    auth_etcd = EmbeddedEtcd()
    try:
        root_file = auth_etcd.enable_auth(JOB, prefix="horde")
    except BaseException:
        auth_etcd.stop()
        raise
    admin = ("--etcd-admin-user", "root", "--etcd-admin-password-file", str(root_file))
    specs = {
        "auth": (f"--rendezvous={auth_etcd.url}", *admin),
        "live": (f"--rendezvous={etcd_server.url}", f"--prefix=resp-{uuid.uuid4().hex[:8]}",
                 "--registration-token", REGISTRATION_TOKEN,
                 "--manifest-dir", str(root / "manifest")),
        "bare": (),
        "dead": (f"--rendezvous=etcd://127.0.0.1:{free_port()}", *admin),
    }
    procs: dict[str, ServerProcess] = {}
    try:
        for name, extra in specs.items():
            workdir = root / name
            workdir.mkdir()
            procs[name] = ServerProcess(f"sqlite:///{workdir / 'ledger.db'}", workdir,
                                        *common, *extra)
            procs[name].start()
        yield {name: proc.url for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()
        auth_etcd.stop()


def test_response_schemas_are_the_models(servers: dict[str, str]) -> None:
    api = Api(fetch_spec(servers["live"]))
    derived = openapi_schemas(RESPONSE_MODELS)
    for name, schema in derived.items():
        assert api.spec["components"]["schemas"][name] == schema
    # every response body refers to a derived schema (none is written inline)
    for path, operations in api.spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema is not None and path != "/api/v1/openapi.json":
                    assert set(schema) == {"$ref"}, (method, path, status, schema)


def fetch_spec(url: str) -> dict[str, Any]:
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/api/v1/openapi.json")
    spec = json.loads(conn.getresponse().read())
    conn.close()
    return spec


def test_every_documented_answer_matches_its_schema(servers: dict[str, str]) -> None:
    live, bare, dead = servers["live"], servers["bare"], servers["dead"]
    api = Api(fetch_spec(live))
    reg = REGISTRATION_TOKEN

    # -- nodes ------------------------------------------------------------------------
    nodes = "/api/v1/nodes"
    tokens = {}
    for node in ("ra", "rb", "rc"):
        tokens[node] = api.call(live, "POST", nodes, json_body={
            "node_id": node, "display_name": node.upper(),
            "hardware": {"gpu": "RTX 3060", "gpu_memory_gb": 12, "cuda": True, "tf": 1.5}},
            token=reg, expect=201)["token"]
    api.call(live, "POST", nodes, json_body={"node_id": "ra"}, token=reg, expect=409)
    api.call(live, "POST", nodes, json_body={"node_id": "zz"}, expect=401)
    api.call(live, "POST", nodes, json_body={"node_id": "zz"}, token="wrong", expect=403)
    api.call(live, "POST", nodes, body=b'{"node_id": ', token=reg, expect=400)
    api.call(live, "POST", nodes, body=TOO_BIG, token=reg, expect=413)
    api.call(live, "POST", nodes, body=b"{}", token=reg, content_type="text/plain",
             expect=415)
    api.call(live, "POST", nodes, json_body={"node_id": "bad id"}, token=reg, expect=422)
    api.call(live, "GET", f"{nodes}?limit=2&offset=1", expect=200)
    api.call(live, "GET", f"{nodes}?limit=0", expect=422)
    api.call(live, "GET", f"{nodes}/ra", expect=200)
    api.call(live, "GET", f"{nodes}/nobody", expect=404)
    tokens["rc"] = api.call(live, "POST", f"{nodes}/rc/token", token=tokens["rc"],
                            expect=200)["token"]
    api.call(live, "POST", f"{nodes}/rc/token", expect=401)
    api.call(live, "POST", f"{nodes}/rc/token", token=tokens["ra"], expect=403)
    api.call(live, "POST", f"{nodes}/nobody/token", token=ADMIN_TOKEN, expect=404)

    # -- per-node etcd credentials: issued (auth), off (live), etcd down (dead) ------------
    creds = f"{nodes}/ra/etcd-credentials"
    auth, dead_tokens = servers["auth"], {}
    for url, store in ((auth, tokens), (dead, dead_tokens)):
        store["ea"] = api.call(url, "POST", nodes, json_body={"node_id": "ea"},
                               expect=201)["token"]
    issued = api.call(auth, "POST", f"{nodes}/ea/etcd-credentials", token=tokens["ea"],
                      expect=200)
    assert issued["user"].endswith("-ea") and issued["password"]
    api.call(live, "POST", creds, token=tokens["ra"], expect=409)
    api.call(dead, "POST", f"{nodes}/ea/etcd-credentials", token=dead_tokens["ea"],
             expect=503)
    api.call(live, "POST", creds, expect=401)
    api.call(live, "POST", creds, token=tokens["rb"], expect=403)
    api.call(live, "POST", f"{nodes}/nobody/etcd-credentials", token=tokens["ra"],
             expect=404)
    api.call(live, "POST", f"{nodes}/bad%20id/etcd-credentials", token=tokens["ra"],
             expect=422)

    # -- reports: stored, settled, duplicate, conflict and rejected results ---------------
    reports = "/api/v1/reports"
    members = ["ra", "rb", "rc"]
    samples = {m: 16 for m in members}
    honest = [report(r, members, samples, loss=0.5, refused={"rc": "stale"} if r else None)
              for r in range(3)]
    for node in members:
        api.call(live, "POST", reports, json_body={"node_id": node, "reports": honest},
                 token=tokens[node], expect=200)
    outsider = report(7, ["rb", "rc"], {"rb": 1, "rc": 1})
    changed = report(0, members, {**samples, "ra": 99})
    answer = api.call(live, "POST", reports, json_body={
        "node_id": "ra", "reports": [honest[0], changed, outsider]},
        token=tokens["ra"], expect=200)
    assert [r["status"] for r in answer["results"]] == ["duplicate", "conflict", "rejected"]
    assert answer["results"][2]["reason"] == "not_a_member"
    one = {"node_id": "ra", "reports": [honest[0]]}
    api.call(live, "POST", reports, json_body=one, expect=401)
    api.call(live, "POST", reports, json_body=one, token=tokens["rb"], expect=403)
    api.call(live, "POST", reports, json_body={**one, "node_id": "nobody"},
             token=tokens["ra"], expect=404)
    api.call(live, "POST", reports, body=b"[", token=tokens["ra"], expect=400)
    api.call(live, "POST", reports, body=TOO_BIG, token=tokens["ra"], expect=413)
    api.call(live, "POST", reports, body=b"{}", token=tokens["ra"],
             content_type="text/plain", expect=415)
    bad = report(0, members, samples, overrides={"rb": {"samples": -1}})
    api.call(live, "POST", reports, json_body={"node_id": "ra", "reports": [bad]},
             token=tokens["ra"], expect=422)

    # -- credits and jobs -------------------------------------------------------------------
    history = api.call(live, "GET", f"{nodes}/ra/credits?limit=10", expect=200)
    assert history["credits"], "the honest rounds were credited"
    api.call(live, "GET", f"{nodes}/nobody/credits", expect=404)
    api.call(live, "GET", f"{nodes}/ra/credits?before=-1", expect=422)
    api.call(live, "GET", "/api/v1/credits/leaderboard?order=rac", expect=200)
    api.call(live, "GET", "/api/v1/credits/leaderboard?order=best", expect=422)
    api.call(live, "GET", "/api/v1/jobs", expect=200)
    job = api.call(live, "GET", f"/api/v1/jobs/{JOB}", expect=200)
    assert job["loss"], "the reported losses are in the series"
    api.call(live, "GET", "/api/v1/jobs/nojob", expect=404)
    api.call(live, "GET", f"/api/v1/jobs/{JOB}?loss_points=-1", expect=422)
    api.call(live, "GET", f"/api/v1/jobs/{JOB}/timeline", expect=200)
    api.call(live, "GET", "/api/v1/jobs/nojob/timeline", expect=404)
    api.call(live, "GET", f"/api/v1/jobs/{JOB}/timeline?limit=0", expect=422)
    api.call(live, "GET", f"/api/v1/jobs/{JOB}/manifest", expect=200)
    api.call(live, "GET", "/api/v1/jobs/nojob/manifest", expect=404)
    assert api.call(live, "GET", f"/api/v1/jobs/{JOB}/files/{MANIFEST_FILE}",
                    expect=200) == b"print('train')\n"
    api.call(live, "GET", f"/api/v1/jobs/{JOB}/files/other.py", expect=404)
    for url in (live, bare, dead):
        api.call(url, "GET", "/api/v1/status", expect=200)
        api.call(url, "GET", "/api/v1/health", expect=200)
    api.call(live, "GET", "/api/v1/status?job=no%20job", expect=422)

    # -- evictions: a real etcd (live), none (bare), an unreachable one (dead) -----------
    evictions = "/api/v1/evictions"
    entry = api.call(live, "POST", evictions, json_body={
        "node_id": "rc", "reason": "tests", "cooldown_seconds": 60},
        token=ADMIN_TOKEN, expect=201)
    assert entry["active"] and entry["until"] is not None
    api.call(live, "POST", evictions, json_body={"node_id": "rb"}, token=ADMIN_TOKEN,
             expect=201)  # for good: `until` is null
    listed = api.call(live, "GET", evictions, expect=200)
    assert {e["node_id"] for e in listed["evictions"]} == {"rb", "rc"}
    api.call(bare, "GET", evictions, expect=200)
    api.call(live, "GET", f"{evictions}?job=no%20job", expect=422)
    api.call(dead, "GET", evictions, expect=503)
    api.call(live, "POST", evictions, json_body={"node_id": "rc"}, expect=401)
    api.call(live, "POST", evictions, json_body={"node_id": "rc"}, token="wrong", expect=403)
    api.call(live, "POST", evictions, body=b"{", token=ADMIN_TOKEN, expect=400)
    api.call(live, "POST", evictions, body=TOO_BIG, token=ADMIN_TOKEN, expect=413)
    api.call(live, "POST", evictions, body=b"{}", token=ADMIN_TOKEN,
             content_type="text/plain", expect=415)
    api.call(live, "POST", evictions, json_body={"node_id": "rc", "cooldown_seconds": 0},
             token=ADMIN_TOKEN, expect=422)
    api.call(bare, "POST", evictions, json_body={"node_id": "rc"}, token=ADMIN_TOKEN,
             expect=409)
    api.call(dead, "POST", evictions, json_body={"node_id": "rc"}, token=ADMIN_TOKEN,
             expect=503)
    api.call(live, "DELETE", f"{evictions}/rc", token=ADMIN_TOKEN, expect=204)
    api.call(live, "DELETE", f"{evictions}/rc", token=ADMIN_TOKEN, expect=404)
    api.call(live, "DELETE", f"{evictions}/rb", expect=401)
    api.call(live, "DELETE", f"{evictions}/rb", token="wrong", expect=403)
    api.call(live, "DELETE", f"{evictions}/rb?job=no%20job", token=ADMIN_TOKEN, expect=422)
    api.call(bare, "DELETE", f"{evictions}/rb", token=ADMIN_TOKEN, expect=409)
    api.call(dead, "DELETE", f"{evictions}/rb", token=ADMIN_TOKEN, expect=503)

    # -- meta and the page -------------------------------------------------------------------
    api.call(live, "GET", "/api/v1/openapi.json", expect=200)
    assert b"horde_" in api.call(live, "GET", "/metrics", expect=200)
    api.call(live, "GET", "/", expect=200)
    api.call(live, "GET", "/?job=no%20job", expect=422)

    documented = {(path, method.upper(), status)
                  for path, operations in api.spec["paths"].items()
                  for method, operation in operations.items()
                  for status in operation["responses"]}
    assert documented - api.seen == set(), "documented answers this test never provoked"
    assert api.seen <= documented


def test_a_drifted_answer_fails_validation(servers: dict[str, str]) -> None:
    """The check above would catch drift: a real answer with a key added, a key taken
    away or a type changed no longer matches the documented schema."""
    api = Api(fetch_spec(servers["live"]))
    schema = {**to_json_schema(api.spec["components"]["schemas"]["Health"]),
              "components": api.components}
    validator = jsonschema_rs.Draft7Validator(schema)
    answer = api.call(servers["live"], "GET", "/api/v1/health", expect=200)
    assert validator.is_valid(answer)
    assert not validator.is_valid({**answer, "extra": 1})
    assert not validator.is_valid({k: v for k, v in answer.items() if k != "status"})
    assert not validator.is_valid({**answer, "schema_revision": 5})
    assert validator.is_valid({**answer, "schema_revision": None})



# -- out-of-range numbers ------------------------------------------------------------------

#: every numeric field of the request bodies (the walk below must find at least these)
NUMERIC_FIELDS = {
    ("ReportBatch", "reports[0].generation"), ("ReportBatch", "reports[0].round"),
    ("ReportBatch", "reports[0].span"), ("ReportBatch", "reports[0].loss"),
    ("ReportBatch", "reports[0].timestamp"),
    ("ReportBatch", "reports[0].contributions[0].samples"),
    ("ReportBatch", "reports[0].contributions[0].staleness"),
    ("ReportBatch", "reports[0].contributions[0].param_version"),
    ("Registration", "hardware.x"), ("Eviction", "cooldown_seconds"),
}


def numeric_leaves(schema: dict[str, Any], schemas: dict[str, Any], path: tuple = ()
                   ) -> Iterator[tuple[tuple, dict[str, Any]]]:
    """(path, schema) of every integer or number a body may hold; `0` steps into an
    array's first item, `"x"` into a free-form object's key `x`."""
    while "$ref" in schema or "allOf" in schema:
        schema = (schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema
                  else schema["allOf"][0])
    for alternative in schema.get("anyOf", []):
        yield from numeric_leaves(alternative, schemas, path)
    kind = schema.get("type")
    if kind in ("integer", "number"):
        yield path, schema
    elif kind == "array":
        yield from numeric_leaves(schema["items"], schemas, (*path, 0))
    elif kind == "object":
        for name, sub in schema.get("properties", {}).items():
            yield from numeric_leaves(sub, schemas, (*path, name))
        if isinstance(schema.get("additionalProperties"), dict):
            yield from numeric_leaves(schema["additionalProperties"], schemas, (*path, "x"))


def dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def with_value(body: Any, path: tuple, value: Any) -> Any:
    body = json.loads(json.dumps(body))
    node = body
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return body


def out_of_range(schema: dict[str, Any]) -> list[Any]:
    """Values just outside the bounds, far outside, and JSON numbers Python reads as inf."""
    low, high = schema["minimum"], schema["maximum"]
    values = [low - 1 if low >= 0 else low * 2, high + 1 if high < 2**52 else high * 2]
    values += [v for v in (2**64, -(2**64)) if not low <= v <= high]
    if schema["type"] == "number":
        values += [RawJson("1e400"), RawJson("-1e400")]
    return values


class RawJson(str):
    """A number written into the body as it is (json.dumps cannot write 1e400)."""


def encode(body: Any) -> bytes:
    marks: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, RawJson):
            key = f"@@raw{len(marks)}@@"
            marks[key] = str(value)
            return key
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))
    for key, raw in marks.items():
        text = text.replace(f'"{key}"', raw)
    return text.encode()


def test_out_of_range_numbers_get_422_on_every_numeric_field(servers: dict[str, str]
                                                             ) -> None:
    url = servers["bare"]
    api = Api(fetch_spec(url))
    schemas = api.spec["components"]["schemas"]
    token = api.call(url, "POST", "/api/v1/nodes", json_body={"node_id": "num-a"},
                     expect=201)["token"]
    members = ["num-a", "num-b"]
    full = report(0, members, {"num-a": 1, "num-b": 1}, loss=0.5, span=1)
    full["timestamp"] = 1_800_000_000.0
    endpoints = {  # schema name: (path, token, a valid body holding every numeric field)
        "ReportBatch": ("/api/v1/reports", token, {"node_id": "num-a", "reports": [full]}),
        "Registration": ("/api/v1/nodes", None, {"node_id": "num-new", "hardware": {}}),
        "Eviction": ("/api/v1/evictions", ADMIN_TOKEN, {"node_id": "num-a"}),
    }
    found = set()
    registered = 0
    for name, (path, bearer, body) in endpoints.items():
        for leaf, schema in numeric_leaves(schemas[name], schemas):
            field = dotted(leaf)
            found.add((name, field))
            assert "minimum" in schema and "maximum" in schema, f"{name}.{field} is unbounded"
            for value in out_of_range(schema):
                answer = api.call(url, "POST", path, body=encode(with_value(body, leaf, value)),
                                  token=bearer, expect=422)
                assert answer["error"]["field"] == field, (name, field, value, answer)
            for value in (schema["minimum"], schema["maximum"]):  # the bounds themselves pass
                if schema["type"] == "integer":
                    value = int(value)
                candidate = with_value(body, leaf, value)
                if name == "Registration":
                    registered += 1
                    candidate["node_id"] = f"num-new-{registered}"
                status = post_status(url, path, encode(candidate), bearer)
                assert status != 422, (name, field, value)
    assert found >= NUMERIC_FIELDS, NUMERIC_FIELDS - found


def post_status(url: str, path: str, body: bytes, token: str | None) -> int:
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=body, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_out_of_range_query_numbers_get_422(servers: dict[str, str]) -> None:
    """Every numeric query parameter the document bounds is enforced at its bounds."""
    url = servers["bare"]
    api = Api(fetch_spec(url))
    api.call(url, "POST", "/api/v1/nodes", json_body={"node_id": "q-a"}, expect=201)
    checked = 0
    for template, operations in api.spec["paths"].items():
        if "get" not in operations:
            continue
        path = template.replace("{node_id}", "q-a").replace("{job}", JOB)
        for parameter in operations["get"].get("parameters", []):
            schema = parameter["schema"]
            if parameter["in"] != "query" or schema.get("type") not in ("integer", "number"):
                continue
            assert "minimum" in schema and "maximum" in schema, (template, parameter["name"])
            for value in (schema["minimum"] - 1, schema["maximum"] + 1):
                status = get_status(url, f"{path}?{parameter['name']}={value}")
                assert status == 422, (template, parameter["name"], value, status)
            checked += 1
    assert checked >= 5  # limit (several routes), offset, before, loss_points


def get_status(url: str, path: str) -> int:
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def test_in_process_answer_check_catches_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """The check every fixture app runs (tests/coordinator/conftest.py) flags an answer
    whose keys drifted from its response model, and passes the same answer undrifted."""
    from coordinator import create_app
    from coordinator.state import EXTENSION
    from coordinator.storage import queries
    from tests.coordinator.helpers import check_answers, make_config, post_reports, register

    app = create_app(make_config(tmp_path))
    problems = check_answers(app)
    try:
        client = app.test_client()
        tokens = {n: register(client, n) for n in ("d-a", "d-b", "d-c")}
        for node, token in tokens.items():
            post_reports(client, node, token, [report(0, list(tokens), dict.fromkeys(tokens, 4))])
        assert client.get("/api/v1/jobs").status_code == 200
        assert problems == []
        summary = queries.job_summary
        monkeypatch.setattr(queries, "job_summary",
                            lambda *a, **k: {**summary(*a, **k), "lag_seconds": 0.5})
        assert client.get("/api/v1/jobs").status_code == 200
        assert len(problems) == 1 and "lag_seconds" in problems[0], problems
    finally:
        app.extensions[EXTENSION].close()
