"""Prometheus metrics: request outcomes counted in-process, job figures read from the ledger.

Counters (`*_total`) restart at zero with the process, as Prometheus expects; gauges that
describe the job (world size, generation, rounds, samples/s, ledger totals) are read
from the database at scrape time, so they are right after a restart too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from coordinator.storage.models import jobs, nodes
from coordinator.storage.queries import recent_rates

if TYPE_CHECKING:
    from coordinator.membership import RendezvousView
    from coordinator.storage import Storage
    from coordinator.storage.ledger import IngestOutcome

logger = logging.getLogger(__name__)

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class _LedgerCollector(Collector):
    def __init__(self, storage: Storage, view: RendezvousView | None,
                 clock: Callable[[], float], window: float) -> None:
        self.storage = storage
        self.view = view
        self.clock = clock
        self.window = window

    def collect(self) -> Iterable[Metric]:
        world = GaugeMetricFamily("horde_world_size", "Members of the job's current generation",
                                  labels=["job"])
        generation = GaugeMetricFamily("horde_generation", "The job's current generation id",
                                       labels=["job"])
        rounds = CounterMetricFamily("horde_rounds", "Rounds with at least one stored report",
                                     labels=["job"])
        rate = GaugeMetricFamily("horde_samples_per_second",
                                 "Credited (accepted, attested) samples per second over the "
                                 "rate window", labels=["job"])
        ledger = CounterMetricFamily("horde_ledger_credit",
                                     "Credit held by all nodes in the ledger")
        registered = GaugeMetricFamily("horde_nodes_registered", "Nodes registered")
        now = self.clock()
        try:
            with self.storage.read() as conn:
                job_rows = list(conn.execute(select(jobs.c.job, jobs.c.generation,
                                                    jobs.c.members, jobs.c.rounds)))
                rates = recent_rates(conn, "job", now, self.window)
                total, count = conn.execute(
                    select(func.coalesce(func.sum(nodes.c.credit_total), 0),
                           func.count())).one()
        except Exception:  # noqa: BLE001 - a scrape must not fail on a busy database
            logger.exception("metrics: cannot read the ledger")
            return
        live = None
        if self.view is not None:
            snap = self.view.snapshot()
            if snap.ok and snap.generation is not None:
                live = (self.view.job, snap.generation.id, snap.generation.size)
        for row in job_rows:
            size = len(json.loads(row.members))
            gen = row.generation
            if live is not None and live[0] == row.job:
                gen, size = live[1], live[2]
            world.add_metric([row.job], size)
            generation.add_metric([row.job], -1 if gen is None else gen)
            rounds.add_metric([row.job], row.rounds)
            rate.add_metric([row.job], rates.get(row.job, 0.0))
        ledger.add_metric([], float(total))
        registered.add_metric([], count)
        yield from (world, generation, rounds, rate, ledger, registered)


class Metrics:
    """The coordinator's registry (one per app, so tests can build many apps)."""

    def __init__(self, storage: Storage, view: RendezvousView | None,
                 clock: Callable[[], float], window: float) -> None:
        self.registry = CollectorRegistry()
        self.reports = Counter("horde_reports", "Round reports received, by outcome",
                               ["status"], registry=self.registry)
        self.credits_granted = Counter("horde_credits_granted",
                                       "Credit (accepted samples) granted by quorum",
                                       registry=self.registry)
        self.headers_settled = Counter("horde_headers_settled",
                                       "Contribution headers settled by a quorum",
                                       registry=self.registry)
        self.rejected_contributions = Counter(
            "horde_rejected_contributions",
            "Contributions attested as not accepted into the aggregate, by reason",
            ["reason"], registry=self.registry)
        self.report_lag = Histogram(
            "horde_report_lag_seconds",
            "Seconds from a round's close (reporter's clock) to its report being stored",
            buckets=LAG_BUCKETS, registry=self.registry)
        self.responses = Counter("horde_http_responses", "API answers, by status code",
                                 ["code"], registry=self.registry)
        self.registry.register(_LedgerCollector(storage, view, clock, window))

    def observe_ingest(self, outcome: IngestOutcome) -> None:
        for result in outcome.results:
            self.reports.labels(result["status"]).inc()
        for grant in outcome.grants:
            self.headers_settled.inc()
            if grant.credit:
                self.credits_granted.inc(grant.credit)
            reason = grant.header[4]
            if not grant.header[3]:
                self.rejected_contributions.labels(reason or "other").inc()
        for lag in outcome.lags:
            self.report_lag.observe(lag)

    def render(self) -> bytes:
        return generate_latest(self.registry)
