"""Read-side queries: nodes, leaderboard, credit history, jobs, loss, timeline.

Each returns plain dicts (JSON-ready, matching the OpenAPI response schemas); RAC is
decayed to `now` here, so a node that stopped earning sinks without any write.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, desc, func, select

from coordinator.storage.ledger import RATE_BUCKET, decayed
from coordinator.storage.models import credits, events, jobs, nodes, rates, rounds


def node_dict(row: Any, now: float, half_life: float, throughput: float = 0.0
              ) -> dict[str, Any]:
    accepted = row.contributions_accepted
    return {
        "node_id": row.node_id,
        "display_name": row.display_name,
        "owner": row.owner,
        "hardware": json.loads(row.hardware),
        "registered_at": row.registered_at,
        "last_report_at": row.last_report_at,
        "credit": int(row.credit_total),
        "rac": round(decayed(row.rac, row.rac_time, now, half_life), 6),
        "contributions_accepted": int(accepted),
        "contributions_refused": int(row.contributions_refused),
        "mean_staleness": round(row.staleness_sum / accepted, 4) if accepted else None,
        "strikes": int(row.strikes),
        "disputes": int(row.disputes),
        "reports": int(row.reports),
        "throughput": round(throughput, 4),
    }


def recent_rates(conn: Connection, scope: str, now: float, window: float,
                 keys: list[str] | None = None) -> dict[str, float]:
    """Credited samples per second per node (scope "node") or job ("job") over roughly
    the last `window` seconds (whole buckets of the `rates` table)."""
    first = int((now - window) // RATE_BUCKET)
    query = (select(rates.c.key, func.sum(rates.c.credit))
             .where(rates.c.scope == scope, rates.c.bucket >= first).group_by(rates.c.key))
    if keys is not None:
        query = query.where(rates.c.key.in_(keys))
    return {key: float(total or 0) / window for key, total in conn.execute(query)}


def throughputs(conn: Connection, now: float, window: float,
                node_ids: list[str] | None = None) -> dict[str, float]:
    """Credited samples per second per node over the last `window` seconds."""
    return recent_rates(conn, "node", now, window, node_ids)


def get_node(conn: Connection, node_id: str) -> Any:
    return conn.execute(select(nodes).where(nodes.c.node_id == node_id)).first()


def node_detail(conn: Connection, node_id: str, now: float, half_life: float,
                window: float) -> dict[str, Any] | None:
    row = get_node(conn, node_id)
    if row is None:
        return None
    rate = throughputs(conn, now, window, [node_id]).get(node_id, 0.0)
    return node_dict(row, now, half_life, rate)


def list_nodes(conn: Connection, now: float, half_life: float, window: float,
               limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    total = conn.execute(select(func.count()).select_from(nodes)).scalar_one()
    rows = conn.execute(select(nodes).order_by(nodes.c.node_id).limit(limit).offset(offset))
    rows = list(rows)
    rates = throughputs(conn, now, window, [r.node_id for r in rows]) if rows else {}
    return [node_dict(r, now, half_life, rates.get(r.node_id, 0.0)) for r in rows], total


def leaderboard(conn: Connection, now: float, half_life: float, limit: int,
                order: str = "credit") -> list[dict[str, Any]]:
    """Nodes ranked by total credit, or by RAC (decayed to now) with `order="rac"`."""
    cols = [nodes.c.node_id, nodes.c.display_name, nodes.c.credit_total, nodes.c.rac,
            nodes.c.rac_time, nodes.c.contributions_accepted]
    if order == "credit":
        rows = conn.execute(select(*cols).order_by(desc(nodes.c.credit_total),
                                                    nodes.c.node_id).limit(limit))
        entries = [(r, decayed(r.rac, r.rac_time, now, half_life)) for r in rows]
    else:
        rows = conn.execute(select(*cols))
        entries = sorted(((r, decayed(r.rac, r.rac_time, now, half_life)) for r in rows),
                         key=lambda e: (-e[1], e[0].node_id))[:limit]
    return [{"rank": i + 1, "node_id": r.node_id, "display_name": r.display_name,
             "credit": int(r.credit_total), "rac": round(rac, 6),
             "rounds": int(r.contributions_accepted)} for i, (r, rac) in enumerate(entries)]


def credit_history(conn: Connection, node_id: str, limit: int, before: float | None
                   ) -> list[dict[str, Any]]:
    query = select(credits).where(credits.c.node_id == node_id)
    if before is not None:
        query = query.where(credits.c.granted_at < before)
    query = query.order_by(desc(credits.c.granted_at), desc(credits.c.round)).limit(limit)
    return [{"job": r.job, "generation": int(r.generation), "round": int(r.round),
             "credit": int(r.credit), "samples": int(r.samples),
             "staleness": int(r.staleness), "param_version": int(r.param_version),
             "accepted": bool(r.accepted), "reason": r.reason,
             "attesters": int(r.attesters), "granted_at": r.granted_at,
             "span": int(r.span)}
            for r in conn.execute(query)]


def job_names(conn: Connection) -> list[str]:
    return [r.job for r in conn.execute(
        select(jobs.c.job).order_by(desc(jobs.c.last_report_at), jobs.c.job))]


def job_summary(conn: Connection, job: str, now: float, window: float
                ) -> dict[str, Any] | None:
    row = conn.execute(select(jobs).where(jobs.c.job == job)).first()
    if row is None:
        return None
    rate = recent_rates(conn, "job", now, window, [job]).get(job, 0.0)
    members = json.loads(row.members)
    return {
        "job": job,
        "generation": row.generation,
        "members": members,
        "world_size": len(members),
        "rounds": int(row.rounds),
        "reports": int(row.reports),
        "samples_credited": int(row.samples_credited),
        "samples_per_second": round(rate, 4),
        "first_seen": row.first_seen,
        "last_report_at": row.last_report_at,
    }


def loss_series(conn: Connection, job: str, limit: int) -> list[dict[str, Any]]:
    """The mean reported loss of the job's last `limit` rounds, oldest first."""
    query = (select(rounds.c.generation, rounds.c.round, rounds.c.first_report_at,
                    rounds.c.loss_sum, rounds.c.loss_count)
             .where(rounds.c.job == job, rounds.c.loss_count > 0)
             .order_by(desc(rounds.c.first_report_at), desc(rounds.c.round)).limit(limit))
    points = [{"time": r.first_report_at, "generation": int(r.generation),
               "round": int(r.round), "loss": r.loss_sum / r.loss_count}
              for r in conn.execute(query)]
    points.reverse()
    return points


def timeline(conn: Connection, job: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` events (of `job` and job-less ones such as registrations)."""
    query = select(events)
    if job is not None:
        query = query.where((events.c.job == job) | (events.c.job.is_(None)))
    query = query.order_by(desc(events.c.id)).limit(limit)
    return [{"id": int(r.id), "time": r.time, "kind": r.kind, "job": r.job,
             "node_id": r.node_id, "generation": None if r.generation is None
             else int(r.generation), "detail": r.detail} for r in conn.execute(query)]
