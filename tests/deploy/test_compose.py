"""compose.yaml (Docker cannot run here): parsed with PyYAML and checked for the topology
docs/deployment.md describes, health checks, ordering and the absence of secrets. The
coordinators' command line is parsed by `horde-coordinator`'s own parser, the etcd
members' flags are checked against the etcd binary's own `--help`, and the rendezvous
URL by the parser `--rendezvous` uses."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from coordinator.cli import build_parser
from rendezvous.etcd import parse_endpoints
from tests.harness import REPO

COMPOSE = REPO / "compose.yaml"
ETCD = ("etcd-1", "etcd-2", "etcd-3")
COORDINATORS = ("coordinator-1", "coordinator-2")
SECRET_WORDS = re.compile(r"PASSWORD|TOKEN|SECRET|KEY", re.I)
NOT_SECRET = {"--initial-cluster-token"}  # a name that keeps clusters apart, not a secret


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def flags(command: list[str]) -> dict[str, str]:
    out = {}
    for item in command:
        if item.startswith("--"):
            name, _, value = item.partition("=")
            out[name] = value
    return out


def test_services_of_the_production_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*ETCD, "etcd-auth", "postgres", *COORDINATORS}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        if name == "etcd-auth":  # runs once to completion: nothing to restart or watch
            assert service.get("restart") == "on-failure"
            continue
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_etcd_runs_with_authentication(compose: dict[str, Any]) -> None:
    """`etcd-auth` turns authentication on once the members are healthy (with the root
    password of a secret file); the coordinators start after it and manage node users as
    root; the members' health check needs no credentials (`endpoint health` would)."""
    services = compose["services"]
    init = services["etcd-auth"]
    assert init["build"]["target"] == "coordinator"
    assert init["image"] == services[COORDINATORS[0]]["image"]
    args = build_parser().parse_args(init["command"][1:])
    assert args.command == "etcd-auth" and args.wait >= 30
    assert [e.host for e in parse_endpoints(args.rendezvous_url)] == list(ETCD)
    assert args.job == "${HORDE_JOB:-default}"
    assert args.etcd_admin_password_file == "/run/secrets/etcd_root_password"
    assert "etcd_root_password" in init["secrets"]
    for name in ETCD:
        assert init["depends_on"][name]["condition"] == "service_healthy"
        check = services[name]["healthcheck"]["test"]
        assert check[check.index("endpoint") + 1] == "status", check
    for name in COORDINATORS:
        service = services[name]
        assert service["depends_on"]["etcd-auth"]["condition"] == \
            "service_completed_successfully"
        assert service["environment"]["HORDE_COORDINATOR_JOB"] == args.job
        serve = build_parser().parse_args(service["command"][1:])
        assert serve.etcd_admin_user == "root"
        assert serve.etcd_admin_password_file == args.etcd_admin_password_file
        assert "etcd_root_password" in service["secrets"]


def test_etcd_members_form_one_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    help_text = _etcd_help()
    clusters, tokens, published = set(), set(), set()
    for name in ETCD:
        command = services[name]["command"]
        assert command[0] == "etcd"
        given = flags(command[1:])
        for flag in given:
            assert flag in help_text, f"{name}: etcd has no flag {flag}"
        assert given["--name"] == name
        assert given["--advertise-client-urls"] == f"http://{name}:2379"
        assert given["--initial-advertise-peer-urls"] == f"http://{name}:2380"
        clusters.add(given["--initial-cluster"])
        tokens.add(given["--initial-cluster-token"])
        volume = services[name]["volumes"][0].split(":")
        assert volume[1] == given["--data-dir"] and volume[0] in compose["volumes"]
        published.add(services[name]["ports"][0].split(":")[0])
    assert len(clusters) == 1 and len(tokens) == 1 and len(published) == 3
    members = dict(item.split("=", 1) for item in clusters.pop().split(","))
    assert members == {name: f"http://{name}:2380" for name in ETCD}


def test_coordinators_share_the_ledger_and_the_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    commands = set()
    for name in COORDINATORS:
        service = services[name]
        assert service["build"]["target"] == "coordinator"
        command = service["command"]
        assert command[:2] == ["horde-coordinator", "serve"]
        args = build_parser().parse_args(command[1:])  # the real parser: no unknown flag
        endpoints = parse_endpoints(args.rendezvous_url)
        assert [e.host for e in endpoints] == list(ETCD)
        assert args.host == "0.0.0.0" and args.admin_token is None  # the token: a file
        assert args.admin_token_file.startswith("/run/secrets/")
        for dependency in ("postgres", *ETCD):
            assert service["depends_on"][dependency]["condition"] == "service_healthy"
        db = service["environment"]["HORDE_COORDINATOR_DB_URL"]
        assert db.startswith("postgresql+psycopg://horde:${HORDE_PG_PASSWORD:?")
        assert db.endswith("@postgres:5432/horde")
        commands.add(tuple(command))
    assert len(commands) == 1, "the coordinators must be interchangeable"
    ports = {services[n]["ports"][0].split(":")[0] for n in COORDINATORS}
    assert len(ports) == 2


def test_no_secret_is_written_in_the_file(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(key):
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), \
                    f"{name}: {key} must come from a secret file"
        for secret in service.get("secrets", []):
            assert compose["secrets"][secret]["file"].startswith("./secrets/")
        for item in service.get("command", []):
            flag = item.split("=")[0]
            if SECRET_WORDS.search(flag) and "file" not in flag and flag not in NOT_SECRET:
                pytest.fail(f"{name}: secret on the command line: {item}")
    # Passwords inside URLs only by interpolation at `docker compose up` time.
    for url in re.findall(r"postgresql\S*://[^\s\"']+", COMPOSE.read_text()):
        userinfo = url.split("://", 1)[1].split("@", 1)[0]
        assert ":" not in userinfo or userinfo.split(":", 1)[1].startswith("${"), url
    assert "/secrets/" in (REPO / ".gitignore").read_text()


def test_the_deployment_page_runs_this_file() -> None:
    text = (REPO / "docs" / "deployment.md").read_text()
    assert "docker compose up" in text and "compose.yaml" in text
    assert "etcd://" in text and "--coordinator" in text


def _etcd_help() -> str:
    from rendezvous.embedded import etcd_binary
    from rendezvous.errors import RendezvousError

    try:
        binary = etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary to check the flags against: {exc}")
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    return result.stdout + result.stderr
