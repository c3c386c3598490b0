"""Nodes: registration (issues the node's token), token rotation, lookups, credit history."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from coordinator.api import API, query_float, query_int, valid_node_id
from coordinator.auth import bearer_token, hash_token, new_token, require_secret, token_matches
from coordinator.contract import Registration
from coordinator.errors import (
    Conflict,
    EtcdAuthOff,
    Forbidden,
    NotFound,
    Unavailable,
    ValidationError,
)
from coordinator.membership import UNKNOWN
from coordinator.state import state
from coordinator.storage import queries
from coordinator.storage.ledger import add_event
from coordinator.storage.models import nodes
from coordinator.validation import validate_body
from rendezvous import records
from rendezvous.errors import RendezvousError

logger = logging.getLogger(__name__)

bp = Blueprint("nodes", __name__, url_prefix=f"{API}/nodes")


def authenticate_node(node_id: str) -> None:
    """Check that the request's bearer token is `node_id`'s: 401, 404 or 403 otherwise."""
    token = bearer_token(request, f"the token of node {node_id}")
    with state().storage.read() as conn:
        stored = conn.execute(select(nodes.c.token_hash).where(
            nodes.c.node_id == node_id)).scalar()
    if stored is None:
        raise NotFound(f"node {node_id} is not registered; register it with "
                       f"POST {API}/nodes first")
    if not token_matches(token, stored):
        raise Forbidden(f"the bearer token does not belong to node {node_id}")


@bp.post("")
def register() -> tuple[Response, int]:
    """Register a node and issue its token (shown once; only its hash is kept)."""
    st = state()
    if st.config.registration_token is not None:
        require_secret(request, st.config.registration_token, "the registration token", "")
    body = validate_body(Registration)
    node_id = body.node_id
    chosen = body.token
    token = chosen or new_token()
    now = st.clock()

    def work(conn: Any) -> bool:
        stored = conn.execute(select(nodes.c.token_hash).where(
            nodes.c.node_id == node_id)).scalar()
        if stored is not None:
            # The same node retrying with its own token (its first answer was lost): the
            # registration stands as it is, and the answer is the same.
            return chosen is not None and token_matches(chosen, stored)
        conn.execute(nodes.insert().values(
            node_id=node_id, display_name=body.display_name, owner=body.owner,
            hardware=json.dumps(body.hardware, separators=(",", ":")),
            token_hash=hash_token(token), registered_at=now, rac_time=now))
        add_event(conn, now, "registered", node_id=node_id,
                  detail=body.display_name)
        return True

    try:
        created = st.storage.run_write(work)
    except IntegrityError:  # registered at this moment through another coordinator
        created = chosen is not None and st.storage.run_write(work)
    if not created:
        raise Conflict(f"node {node_id} is already registered; keep using its token, or ask "
                       f"the operator to issue a new one (POST {API}/nodes/{node_id}/token)")
    logger.info("registered node %s", node_id)
    return jsonify({"node_id": node_id, "token": token, "registered_at": now}), 201


@bp.post("/<node_id>/token")
def rotate_token(node_id: str) -> Response:
    """Issue a new token for a node; the old one stops working. Node's token or admin's."""
    st = state()
    if not valid_node_id(node_id):
        raise NotFound(f"no node {node_id[:130]!r}")
    presented = bearer_token(request, f"the token of node {node_id} or the admin token")
    with st.storage.read() as conn:
        stored = conn.execute(select(nodes.c.token_hash).where(
            nodes.c.node_id == node_id)).scalar()
    if stored is None:
        raise NotFound(f"node {node_id} is not registered")
    admin = st.config.admin_token
    if not token_matches(presented, stored) and not (
            admin is not None and token_matches(presented, hash_token(admin))):
        raise Forbidden(f"the bearer token is neither node {node_id}'s nor the admin token")
    token = new_token()
    now = st.clock()

    def work(conn: Any) -> None:
        conn.execute(update(nodes).where(nodes.c.node_id == node_id).values(
            token_hash=hash_token(token)))
        add_event(conn, now, "token", node_id=node_id, detail="token reissued")

    st.storage.run_write(work)
    logger.info("issued a new token for node %s", node_id)
    return jsonify({"node_id": node_id, "token": token, "registered_at": now})


ETCD_AUTH_OFF = ("this job runs without etcd authentication: the coordinator holds no etcd "
                 "identity that may manage users, so connect to the rendezvous without "
                 "credentials (the job owner turns it on with horderun --etcd-auth, or "
                 "horde-coordinator serve --etcd-admin-user/--etcd-admin-password-file; "
                 "docs/security.md)")


@bp.post("/<node_id>/etcd-credentials")
def etcd_credentials(node_id: str) -> Response:
    """Issue `node_id`'s own etcd user (reads the job, writes only its own keys), with its
    node token. Each call replaces the password: the previous one stops working."""
    st = state()
    if not valid_node_id(node_id):
        raise ValidationError(f"node id {node_id[:130]!r} is invalid: use letters, digits and "
                              ". _ : @ - (at most 128 characters)", field="path.node_id")
    authenticate_node(node_id)
    admin = st.etcd_admin
    if admin is None:
        raise EtcdAuthOff(ETCD_AUTH_OFF)
    job = admin.keys.job
    now = st.clock()
    try:
        kv = admin.backend.get(admin.keys.blacklisted(node_id))
        entry = records.read_record(kv, records.parse_blacklist_entry) if kv else None
        if entry is not None and entry.active(now):
            admin.revoke_node(node_id)
            raise Forbidden(f"node {node_id} is evicted from job {job} ({entry.reason[:200]}); "
                            "it gets no etcd credentials until the operator pardons it")
        creds = admin.issue_node(node_id)
    except RendezvousError as exc:
        raise Unavailable(f"cannot issue etcd credentials on the rendezvous: {exc}") from exc
    except ValueError as exc:
        raise ValidationError(f"node id {node_id!r} cannot name an etcd user of job {job}: "
                              f"{exc}", field="path.node_id") from None
    st.storage.run_write(lambda conn: add_event(
        conn, now, "etcd-credentials", job=job, node_id=node_id,
        detail=f"etcd user {creds.user} issued"))
    logger.info("issued etcd user %s for node %s", creds.user, node_id)
    answer = {"node_id": node_id, "job": job, "user": creds.user,
              "password": creds.password, "issued_at": now}
    ca = etcd_ca_pem(admin.backend)
    if ca is not None:
        answer["etcd_ca"] = ca
    return jsonify(answer)


def etcd_ca_pem(backend: Any) -> str | None:
    """The CA certificate (PEM) the coordinator verifies etcd with, if it has a file of its
    own: a joining node gets it with its credentials and checks it against the fingerprint
    the job owner gave it (it is public, but only the pin makes it trustworthy)."""
    tls = getattr(backend, "tls", None)
    path = getattr(tls, "cacert", None)
    if not path:
        return None
    try:
        with open(path, encoding="ascii") as handle:
            pem = handle.read(1 << 16)
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("cannot read etcd's CA file %s for joining nodes: %s", path, exc)
        return None
    return pem if "-----BEGIN CERTIFICATE-----" in pem else None


@bp.get("")
def list_nodes() -> Response:
    st = state()
    limit = query_int("limit", 100, 1, 1000)
    offset = query_int("offset", 0, 0, 10**9)
    now = st.clock()
    with st.storage.read() as conn:
        items, total = queries.list_nodes(conn, now, st.config.half_life_seconds,
                                          st.config.rate_window, limit, offset)
    snap = st.view.snapshot() if st.view is not None else None
    wall = now
    for item in items:
        item["state"] = snap.state_of(item["node_id"], wall) if snap is not None else UNKNOWN
    return jsonify({"nodes": items, "total": total, "limit": limit, "offset": offset})


@bp.get("/<node_id>")
def get_node(node_id: str) -> Response:
    st = state()
    if not valid_node_id(node_id):
        raise NotFound(f"no node {node_id[:130]!r}")
    now = st.clock()
    with st.storage.read() as conn:
        item = queries.node_detail(conn, node_id, now, st.config.half_life_seconds,
                                   st.config.rate_window)
    if item is None:
        raise NotFound(f"node {node_id} is not registered")
    snap = st.view.snapshot() if st.view is not None else None
    item["state"] = snap.state_of(node_id, now) if snap is not None else UNKNOWN
    return jsonify(item)


@bp.get("/<node_id>/credits")
def credit_history(node_id: str) -> Response:
    """The rounds a node was credited for, newest first (page with `before`)."""
    st = state()
    if not valid_node_id(node_id):
        raise NotFound(f"no node {node_id[:130]!r}")
    limit = query_int("limit", 100, 1, 1000)
    before = query_float("before", 0.0, 1e12)
    with st.storage.read() as conn:
        if queries.get_node(conn, node_id) is None:
            raise NotFound(f"node {node_id} is not registered")
        items = queries.credit_history(conn, node_id, limit, before)
    return jsonify({"node_id": node_id, "credits": items})
