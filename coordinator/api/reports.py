"""Round reports: the batch endpoint workers post to (see coordinator.contract)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request

from coordinator.api import API
from coordinator.api.nodes import authenticate_node
from coordinator.auth import bearer_token
from coordinator.contract import ReportBatch, parse_batch
from coordinator.state import state
from coordinator.storage.ledger import CONFLICT, DUPLICATE, REJECTED, STORED
from coordinator.validation import validate_body

logger = logging.getLogger(__name__)

bp = Blueprint("reports", __name__, url_prefix=f"{API}/reports")


@bp.post("")
def post_reports() -> Response:
    """Store a batch of round reports; 200 means every report in it is durably handled.

    Checks, in order: a bearer token is present (401), the body is JSON (415/413/400)
    and valid (422), the node is registered (404), the token is the node's (403).
    Each report then gets a status: stored, duplicate (already stored: harmless),
    conflict (already stored with different content: the first one stays) or rejected
    (with a reason). None of them should be sent again, except a rejection marked
    `retry` (the generation is not known from the rendezvous yet).
    """
    st = state()
    bearer_token(request, "the reporting node's token")
    node_id, batch = parse_batch(validate_body(ReportBatch))
    authenticate_node(node_id)
    st.learn_generations(batch)
    outcome = st.ledger.ingest(node_id, batch)
    st.metrics.observe_ingest(outcome)
    counts = {s: outcome.count(s) for s in (STORED, DUPLICATE, CONFLICT, REJECTED)}
    if counts[REJECTED] or counts[CONFLICT]:
        logger.info("reports from %s: %s", node_id, counts)
    credited = sum(g.credit for g in outcome.grants)
    return jsonify({**counts, "settled": len(outcome.grants), "credited": credited,
                    "results": outcome.results})
