"""Job manifests: the owner-signed manifest of a volunteer job and the files it pins.

The coordinator only serves what the owner put in `--manifest-dir` (the signed envelope
`manifest.signed.json` and the job's files); it does not vouch for them: the volunteer
client checks the owner's signature and every file's SHA-256 itself.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, send_file

from coordinator.api import API
from coordinator.api.jobs import _JOB
from coordinator.errors import NotFound
from coordinator.state import state

bp = Blueprint("manifests", __name__, url_prefix=f"{API}/jobs")
ENVELOPE = "manifest.signed.json"


def _envelope(job: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The manifest folder, the signed envelope and the (unverified) manifest of `job`."""
    folder = state().config.manifest_dir
    if not _JOB.fullmatch(job) or folder is None:
        raise NotFound(f"no manifest for job {job[:70]!r}: this coordinator serves no "
                       "volunteer job (horde-coordinator serve --manifest-dir DIR)")
    root = Path(folder)
    try:
        envelope = json.loads((root / ENVELOPE).read_text(encoding="utf-8"))
        manifest = json.loads(base64.b64decode(envelope["manifest"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise NotFound(f"no readable {ENVELOPE} in the manifest folder; sign the job with "
                       "horde-volunteer manifest sign") from None
    if not isinstance(manifest, dict) or manifest.get("job") != job:
        raise NotFound(f"this coordinator serves no manifest for job {job}")
    return root, envelope, manifest


@bp.get("/<job>/manifest")
def get_manifest(job: str) -> Response:
    """The job's signed manifest, as the owner signed it."""
    _, envelope, _ = _envelope(job)
    return jsonify({k: envelope.get(k) for k in ("manifest", "signature", "public_key")})


@bp.get("/<job>/files/<path:name>")
def get_file(job: str, name: str) -> Response:
    """One file the job's manifest pins (no other file of the folder is served)."""
    root, _, manifest = _envelope(job)
    files = manifest.get("files")
    if not isinstance(files, dict) or name not in files:
        raise NotFound(f"{name[:100]!r} is not a file of job {job}'s manifest")
    path = (root / name).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise NotFound(f"{name[:100]!r} is not in the manifest folder")
    return send_file(path, mimetype="application/octet-stream", max_age=0)
