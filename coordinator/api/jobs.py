"""Jobs: their state (generation, world size, rounds, samples/s, loss) and timeline."""

from __future__ import annotations

import re

from flask import Blueprint, Response, jsonify, request

from coordinator.api import API, query_int
from coordinator.contract import JOB_PATTERN
from coordinator.errors import NotFound, ValidationError
from coordinator.state import state
from coordinator.status import LOSS_POINTS, build_status
from coordinator.storage import queries

bp = Blueprint("jobs", __name__, url_prefix=API)
_JOB = re.compile(JOB_PATTERN[1:-1])


def _summary_or_404(job: str) -> dict:
    st = state()
    if not _JOB.fullmatch(job):
        raise NotFound(f"no job {job[:70]!r}")
    with st.storage.read() as conn:
        summary = queries.job_summary(conn, job, st.clock(), st.config.rate_window)
    if summary is None:
        raise NotFound(f"job {job} has no reports yet")
    return summary


@bp.get("/jobs")
def list_jobs() -> Response:
    st = state()
    now = st.clock()
    with st.storage.read() as conn:
        items = [queries.job_summary(conn, name, now, st.config.rate_window)
                 for name in queries.job_names(conn)]
    return jsonify({"jobs": [i for i in items if i is not None]})


@bp.get("/jobs/<job>")
def get_job(job: str) -> Response:
    summary = _summary_or_404(job)
    st = state()
    limit = query_int("loss_points", LOSS_POINTS, 0, 5000)
    with st.storage.read() as conn:
        summary["loss"] = queries.loss_series(conn, job, limit) if limit else []
    return jsonify(summary)


@bp.get("/jobs/<job>/timeline")
def job_timeline(job: str) -> Response:
    _summary_or_404(job)
    st = state()
    limit = query_int("limit", 100, 1, 1000)
    with st.storage.read() as conn:
        items = queries.timeline(conn, job, limit)
    return jsonify({"job": job, "events": items})


@bp.get("/status")
def status() -> Response:
    """Everything the status page shows, in one document (it polls this)."""
    job = request.args.get("job")
    if job is not None and not _JOB.fullmatch(job):
        raise ValidationError(f"query parameter job={job[:70]!r} is not a job name",
                              field="query.job")
    return jsonify(build_status(state(), job))
