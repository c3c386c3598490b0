"""The OpenAPI description, a health check, and Prometheus metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from coordinator.openapi import openapi_document
from coordinator.state import state

bp = Blueprint("meta", __name__)


@bp.get("/api/v1/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())


@bp.get("/api/v1/health")
def health() -> Response:
    st = state()
    revision = st.storage.current_revision()
    if st.view is None:
        rendezvous = "not configured"
    else:
        rendezvous = "ok" if st.view.snapshot().ok else "unreachable"
    return jsonify({"status": "ok", "schema_revision": revision, "rendezvous": rendezvous})


@bp.get("/metrics")
def metrics() -> Response:
    return Response(state().metrics.render(),
                    mimetype="text/plain", headers={"Cache-Control": "no-store"})
