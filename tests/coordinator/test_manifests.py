"""The coordinator serves a volunteer job's signed manifest and only the files it pins."""

from __future__ import annotations

import json

import pytest

from volunteer_client.manifest import (
    ENVELOPE_NAME,
    build_manifest,
    generate_key,
    load_private_key,
    sign,
)


@pytest.fixture
def job_app(make_app, tmp_path):
    folder = tmp_path / "jobdir"
    (folder / "sub").mkdir(parents=True)
    (folder / "train.py").write_text("print(1)\n")
    (folder / "sub" / "data.txt").write_text("x\n")
    generate_key(tmp_path / "owner.key")
    manifest = build_manifest(folder, "digits", "etcd://h:2379", ["train.py"])
    (folder / ENVELOPE_NAME).write_text(json.dumps(sign(manifest, load_private_key(
        tmp_path / "owner.key"))))
    (tmp_path / "secret.txt").write_text("not for volunteers\n")
    (folder / "unlisted.txt").write_text("not in the manifest\n")
    return make_app(manifest_dir=str(folder)).test_client(), folder


def test_manifest_and_pinned_files_are_served(job_app):
    client, folder = job_app
    answer = client.get("/api/v1/jobs/digits/manifest")
    assert answer.status_code == 200
    assert answer.get_json() == json.loads((folder / ENVELOPE_NAME).read_text())
    assert client.get("/api/v1/jobs/digits/files/train.py").data == b"print(1)\n"
    assert client.get("/api/v1/jobs/digits/files/sub/data.txt").data == b"x\n"


@pytest.mark.parametrize("path", [
    "/api/v1/jobs/other/manifest",                  # another job
    "/api/v1/jobs/digits/files/unlisted.txt",       # in the folder, not in the manifest
    "/api/v1/jobs/digits/files/../secret.txt",      # outside the folder
    "/api/v1/jobs/digits/files/%2e%2e/secret.txt",
    "/api/v1/jobs/digits/files/manifest.signed.json",
    "/api/v1/jobs/bad%20name/manifest",
])
def test_nothing_else_is_served(job_app, path):
    client, _ = job_app
    answer = client.get(path)
    assert answer.status_code == 404, path
    assert b"not for volunteers" not in answer.data


def test_a_coordinator_without_a_manifest_folder_says_how_to_serve_one(client):
    answer = client.get("/api/v1/jobs/digits/manifest")
    assert answer.status_code == 404
    assert "--manifest-dir" in answer.get_json()["error"]["message"]
