"""The status of a job in one JSON document: what the status page shows and polls."""

from __future__ import annotations

from typing import Any

from coordinator.membership import UNKNOWN
from coordinator.state import CoordinatorState
from coordinator.storage import queries

NODE_ROWS = 200
LEADERBOARD_ROWS = 10
TIMELINE_ROWS = 40
LOSS_POINTS = 300
_STATE_ORDER = {"alive": 0, "waiting": 1, "evicted": 2, "unknown": 3, "gone": 4}


def choose_job(st: CoordinatorState, requested: str | None) -> str | None:
    if requested:
        return requested
    if st.default_job is not None:
        return st.default_job
    with st.storage.read() as conn:
        names = queries.job_names(conn)
    return names[0] if names else None


def build_status(st: CoordinatorState, requested_job: str | None = None) -> dict[str, Any]:
    now = st.clock()
    cfg = st.config
    job = choose_job(st, requested_job)
    with st.storage.read() as conn:
        jobs = queries.job_names(conn)
        summary = queries.job_summary(conn, job, now, cfg.rate_window) if job else None
        node_items, total = queries.list_nodes(conn, now, cfg.half_life_seconds,
                                               cfg.rate_window, NODE_ROWS, 0)
        board = queries.leaderboard(conn, now, cfg.half_life_seconds, LEADERBOARD_ROWS)
        events = queries.timeline(conn, job, TIMELINE_ROWS)
        loss = queries.loss_series(conn, job, LOSS_POINTS) if job else []
    if summary is None:
        summary = {"job": job, "generation": None, "members": [], "world_size": 0,
                   "rounds": 0, "reports": 0, "samples_credited": 0,
                   "samples_per_second": 0.0, "first_seen": None, "last_report_at": None}
    summary["state"] = "unknown"
    summary["leader"] = None
    rendezvous: dict[str, Any] = {"configured": st.view is not None, "reachable": None,
                                  "error": None}
    snap = None
    if st.view is not None:
        snap = st.view.snapshot()
        rendezvous["reachable"] = snap.ok
        rendezvous["error"] = snap.error
        if snap.ok and snap.job == job:
            if snap.generation is not None:
                summary["generation"] = snap.generation.id
                summary["members"] = snap.generation.node_ids
                summary["world_size"] = snap.generation.size
            summary["leader"] = snap.leader
            summary["state"] = snap.status.state if snap.status is not None else "forming"
        elif snap.job != job:
            snap = None
    if jobs and job not in jobs and job is not None:
        jobs = [job, *jobs]
    elif not jobs and job is not None:
        jobs = [job]

    for item in node_items:
        item["registered"] = True
        item["state"] = snap.state_of(item["node_id"], now) if snap is not None else UNKNOWN
    if snap is not None:
        known = {item["node_id"] for item in node_items}
        extra = set(snap.registered) | set(snap.generation.node_ids if snap.generation else [])
        extra |= {n for n, e in snap.blacklist.items() if e.active(now)}
        for node_id in sorted(extra - known):
            info = snap.registered.get(node_id)
            node_items.append({
                "node_id": node_id, "display_name": "", "owner": "",
                "hardware": dict(info.hardware) if info is not None else {},
                "registered_at": None, "last_report_at": None, "credit": 0, "rac": 0.0,
                "contributions_accepted": 0, "contributions_refused": 0,
                "mean_staleness": None, "strikes": 0, "disputes": 0, "reports": 0,
                "throughput": 0.0, "registered": False,
                "state": snap.state_of(node_id, now)})
        for item in node_items:
            info = snap.registered.get(item["node_id"])
            if not item["hardware"] and info is not None and info.hardware:
                item["hardware"] = dict(info.hardware)
    node_items.sort(key=lambda n: (_STATE_ORDER.get(n["state"], 9), -n["credit"],
                                   n["node_id"]))
    return {
        "now": now,
        "job": summary,
        "jobs": jobs,
        "rendezvous": rendezvous,
        "nodes": node_items,
        "nodes_total": total,
        "leaderboard": board,
        "timeline": events,
        "loss": loss,
        "half_life_days": cfg.half_life_days,
        "refresh_seconds": cfg.page_refresh_seconds,
    }
