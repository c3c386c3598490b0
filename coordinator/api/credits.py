"""Credits: the leaderboard (total credit and RAC)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from coordinator.api import API, query_choice, query_int
from coordinator.state import state
from coordinator.storage import queries

bp = Blueprint("credits", __name__, url_prefix=f"{API}/credits")


@bp.get("/leaderboard")
def leaderboard() -> Response:
    """Nodes ranked by total credit (`order=credit`) or recent-average credit (`order=rac`)."""
    st = state()
    limit = query_int("limit", 20, 1, 1000)
    order = query_choice("order", "credit", ("credit", "rac"))
    with st.storage.read() as conn:
        entries = queries.leaderboard(conn, st.clock(), st.config.half_life_seconds, limit,
                                      order)
    return jsonify({"order": order, "half_life_days": st.config.half_life_days,
                    "entries": entries})
