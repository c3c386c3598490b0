"""The status page: server-rendered HTML that then refreshes itself from /api/v1/status."""

from __future__ import annotations

import datetime
import re

from flask import Blueprint, render_template, request

from coordinator.contract import JOB_PATTERN
from coordinator.errors import ValidationError
from coordinator.state import state
from coordinator.status import build_status

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static/coordinator")
_JOB = re.compile(JOB_PATTERN[1:-1])


@bp.app_template_filter("clock")
def _clock(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value).strftime("%H:%M:%S")


@bp.app_template_filter("num")
def _num(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


@bp.get("/")
def status_page() -> str:
    job = request.args.get("job")
    if job is not None and not _JOB.fullmatch(job):
        raise ValidationError(f"query parameter job={job[:70]!r} is not a job name",
                              field="query.job")
    app_state = state()
    status = build_status(app_state, job)
    return render_template("status.html", status=status, quorum=app_state.config.quorum)
