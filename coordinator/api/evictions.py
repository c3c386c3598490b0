"""Evictions: the operator blacklists a node (admin token); the leader drops it next
generation and keeps it out for the cooldown."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from flask import Blueprint, Response, jsonify, request

from coordinator.api import API, valid_node_id
from coordinator.auth import require_secret
from coordinator.contract import JOB_PATTERN, Eviction
from coordinator.errors import Conflict, NotFound, Unavailable, ValidationError
from coordinator.state import CoordinatorState, state
from coordinator.storage.ledger import add_event
from coordinator.validation import validate_body
from rendezvous.errors import RendezvousError
from rendezvous.generation import BlacklistEntry

logger = logging.getLogger(__name__)

bp = Blueprint("evictions", __name__, url_prefix=f"{API}/evictions")
_JOB = re.compile(JOB_PATTERN[1:-1])
ADMIN_DISABLED = ("admin actions are disabled: start the coordinator with --admin-token "
                  "(or HORDE_COORDINATOR_ADMIN_TOKEN)")


def _require_admin(st: CoordinatorState) -> None:
    require_secret(request, st.config.admin_token, "the admin token", ADMIN_DISABLED)


def _require_view(st: CoordinatorState) -> Any:
    if st.view is None:
        raise Conflict("this coordinator has no rendezvous configured (--rendezvous), so it "
                       "cannot evict nodes")
    return st.view


def _entry(entry: BlacklistEntry, job: str, now: float) -> dict[str, Any]:
    return {"node_id": entry.node_id, "job": job, "reason": entry.reason,
            "until": None if math.isinf(entry.until) else entry.until,
            "count": entry.count, "active": entry.active(now)}


def _job_arg(st: CoordinatorState) -> str:
    job = request.args.get("job")
    if job is None:
        return st.view.job if st.view is not None else (st.config.job or "default")
    if not _JOB.fullmatch(job):
        raise ValidationError(f"query parameter job={job[:70]!r} is not a job name",
                              field="query.job")
    return job


@bp.post("")
def evict() -> tuple[Response, int]:
    st = state()
    _require_admin(st)
    body = validate_body(Eviction)
    view = _require_view(st)
    job = body.job if body.job is not None else view.job
    reason = body.reason or "evicted by the operator"
    node_id = body.node_id
    try:
        entry = view.evict(node_id, reason, body.cooldown_seconds, job)
    except RendezvousError as exc:
        raise Unavailable(f"cannot write the blacklist entry: {exc}") from exc
    if st.etcd_admin is not None and job == st.etcd_admin.keys.job:
        try:  # the node's etcd user goes with it: etcd refuses its writes from now on
            st.etcd_admin.revoke_node(node_id)
        except (RendezvousError, ValueError) as exc:
            logger.warning("job %s: could not revoke the etcd user of evicted node %s: %s "
                           "(its blacklist entry stands; it gets no new credentials)",
                           job, node_id, exc)
    now = st.clock()
    st.storage.run_write(lambda conn: add_event(
        conn, now, "evicted", job=job, node_id=node_id, detail=f"by operator: {reason}"[:200],
        dedupe=f"evict:{job}:{node_id}:{entry.count}"))
    logger.warning("job %s: operator evicted node %s: %s", job, node_id, reason)
    return jsonify(_entry(entry, job, now)), 201


@bp.get("")
def list_evictions() -> Response:
    st = state()
    job = _job_arg(st)
    if st.view is None:
        return jsonify({"job": job, "configured": False, "evictions": []})
    try:
        entries = st.view.blacklist(job)
    except RendezvousError as exc:
        raise Unavailable(f"cannot read the blacklist: {exc}") from exc
    now = st.clock()
    return jsonify({"job": job, "configured": True,
                    "evictions": [_entry(e, job, now) for e in entries]})


@bp.delete("/<node_id>")
def pardon(node_id: str) -> Response:
    st = state()
    _require_admin(st)
    view = _require_view(st)
    job = _job_arg(st)
    if not valid_node_id(node_id):
        raise NotFound(f"no blacklist entry for {node_id[:130]!r}")
    try:
        existed = view.pardon(node_id, job)
    except RendezvousError as exc:
        raise Unavailable(f"cannot delete the blacklist entry: {exc}") from exc
    if not existed:
        raise NotFound(f"node {node_id} is not blacklisted in job {job}")
    now = st.clock()
    st.storage.run_write(lambda conn: add_event(
        conn, now, "pardoned", job=job, node_id=node_id, detail="blacklist entry removed"))
    logger.warning("job %s: operator removed the blacklist entry of %s", job, node_id)
    return Response(status=204)
