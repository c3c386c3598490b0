"""The credit ledger: stores round reports once and grants credit on a quorum.

Rules (docs/coordinator.md explains why they resist cheating):

- A report is keyed by (job, generation, round, reporter); a second copy of the same key
  is a `duplicate` (or a `conflict` when its content differs: the first one stays).
- A report is accepted only for a generation the coordinator learned from the rendezvous
  (`generation_unknown` otherwise, which the worker resends later): reports never create
  or change a generation. The reporter must be one of its members, and the report's
  member list must equal the generation's. (A coordinator configured to trust reported
  membership, for a closed cluster or tests, lets a quorum establish a generation.)
- A report may cover at most `max_span` rounds, and no header may claim more than
  `max_samples_per_round` samples per round of its span (`over_limit` otherwise).
- The header of node X in a round is settled when `needed = min(quorum, members - 1)`
  reports by *other* members, with the same member list and span (the consecutive
  rounds a report covers), agree on it exactly (and no other header has as many votes).
  X's own report never counts for X; a one-member round can never be attested.
- A settled header is granted once (a row in `credits`, whose primary key forbids a
  second) and never revised. It earns its samples when accepted, nothing otherwise.
- Everything a batch changes (reports, grants, node totals, counters) is one transaction.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Float, and_, bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from coordinator.contract import STRIKE_REASONS, Header, RoundReport
from coordinator.storage import Storage
from coordinator.storage.models import (
    credits,
    events,
    generations,
    jobs,
    nodes,
    rates,
    reports,
    rounds,
)

LN2 = math.log(2.0)
SECONDS_PER_DAY = 86400.0
RATE_BUCKET = 5.0  # seconds per bucket of the `rates` table
RATE_KEEP = 3600.0  # seconds of buckets kept

STORED, DUPLICATE, CONFLICT, REJECTED = "stored", "duplicate", "conflict", "rejected"
NOT_A_MEMBER = "not_a_member"
MEMBERSHIP_MISMATCH = "membership_mismatch"
GENERATION_UNKNOWN = "generation_unknown"
OVER_LIMIT = "over_limit"
#: rejections that can change later (the rendezvous has not been read yet): resend
RETRYABLE = frozenset({GENERATION_UNKNOWN})

RoundKey = tuple[str, int, int]


def decayed(value: float, since: float, now: float, half_life: float) -> float:
    """`value` (a RAC stored at time `since`) decayed to `now`."""
    return value * 2.0 ** (-max(0.0, now - since) / half_life)


def rac_after(rac: float, rac_time: float, credit: float, now: float, half_life: float
              ) -> float:
    """RAC (credit per day, exponentially weighted) after `credit` granted at `now`.

    Each credit c granted at t_i adds `c * ln2/H * 2^-((now - t_i)/H)` per second (times
    86400 per day): a node that earns r credit/day for long has a RAC of r, and a node
    that stops sees its RAC halve every half-life H.
    """
    return decayed(rac, rac_time, now, half_life) + credit * LN2 * SECONDS_PER_DAY / half_life


def _dialect_insert(conn: Connection, table: Any) -> Any:
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert(table)
    if name == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(f"upserts are not implemented for {name}")


def add_rates(conn: Connection, now: float, amounts: Counter[tuple[str, str]]) -> None:
    """Add credit to the current time bucket of each (scope, key): node or job rates."""
    if not amounts:
        return
    stmt = _dialect_insert(conn, rates)
    stmt = stmt.on_conflict_do_update(index_elements=[rates.c.scope, rates.c.key, rates.c.bucket],
                                      set_={"credit": rates.c.credit + stmt.excluded.credit})
    bucket = int(now // RATE_BUCKET)
    conn.execute(stmt, [{"scope": scope, "key": key, "bucket": bucket, "credit": credit}
                        for (scope, key), credit in sorted(amounts.items())])


def insert_ignore(conn: Connection, table: Any) -> Any:
    """`INSERT ... ON CONFLICT DO NOTHING` for the connection's dialect."""
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"insert-or-ignore is not implemented for {name}")


# The hot bulk statements go to the driver directly (executemany of plain tuples): building
# SQLAlchemy parameter dicts for hundreds of rows per batch costs more than the writes.
_SQL_CREATE_ROUND = (
    "INSERT INTO rounds (job, generation, round, first_report_at, world_size, span, reports, "
    "settled, samples, loss_sum, loss_count) VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0) "
    "ON CONFLICT DO NOTHING")
_SQL_INSERT_REPORT = (
    "INSERT INTO reports (job, generation, round, reporter, received_at, digest, members, "
    "headers, loss, disputed, span) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SQL_INSERT_CREDIT = (
    "INSERT INTO credits (job, generation, round, node_id, credit, samples, staleness, "
    "param_version, accepted, reason, attesters, registered, granted_at, span) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SQL_COUNT_ROUND = (
    "UPDATE rounds SET reports = reports + ?, settled = settled + ?, samples = samples + ?, "
    "loss_sum = loss_sum + ?, loss_count = loss_count + ? "
    "WHERE job = ? AND generation = ? AND round = ?")


def _driver_many(conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """executemany of `sql` (written with `?` placeholders) in the driver's paramstyle."""
    if not rows:
        return
    if conn.dialect.paramstyle != "qmark":
        sql = sql.replace("?", "%s")
    conn.exec_driver_sql(sql, rows)


_MARK_DISPUTED = update(reports).where(
    reports.c.job == bindparam("k_job"), reports.c.generation == bindparam("k_gen"),
    reports.c.round == bindparam("k_round"),
    reports.c.reporter == bindparam("k_reporter")).values(disputed=True)
_NODE_TOTALS = ("last_report_at", "credit_total", "rac", "rac_time", "contributions_accepted",
                "contributions_refused", "staleness_sum", "strikes", "disputes", "reports")
_UPDATE_NODES = update(nodes).where(nodes.c.node_id == bindparam("k_node")).values(
    **{c: bindparam(f"v_{c}") for c in _NODE_TOTALS})
_ROUND_OF = (bindparam("job"), bindparam("gen"), bindparam("rounds", expanding=True))


def _in_rounds(table: Any) -> Any:
    job, gen, rnds = _ROUND_OF
    return and_(table.c.job == job, table.c.generation == gen, table.c.round.in_(rnds))


_SELECT_ROUNDS = (select(rounds).where(_in_rounds(rounds)).order_by(rounds.c.round)
                  .with_for_update())
_SELECT_REPORTS = select(reports.c.job, reports.c.generation, reports.c.round,
                         reports.c.reporter, reports.c.members, reports.c.headers,
                         reports.c.digest, reports.c.disputed,
                         reports.c.span).where(_in_rounds(reports))
_SELECT_CREDITS = select(credits.c.job, credits.c.generation, credits.c.round,
                         credits.c.node_id, credits.c.samples, credits.c.staleness,
                         credits.c.param_version, credits.c.accepted,
                         credits.c.reason, credits.c.span).where(_in_rounds(credits))
_SELECT_GENERATION = select(generations.c.members, generations.c.source).where(
    generations.c.job == bindparam("job"), generations.c.generation == bindparam("gen"))
_SELECT_NODES = (select(nodes).where(nodes.c.node_id.in_(bindparam("ids", expanding=True)))
                 .order_by(nodes.c.node_id).with_for_update())
_UPDATE_JOB = update(jobs).where(jobs.c.job == bindparam("k_job")).values(
    rounds=jobs.c.rounds + bindparam("d_rounds"),
    reports=jobs.c.reports + bindparam("d_reports"),
    samples_credited=jobs.c.samples_credited + bindparam("d_samples"),
    last_report_at=func.coalesce(bindparam("v_last", type_=Float), jobs.c.last_report_at))


@dataclass(frozen=True)
class Grant:
    """A header that reached its quorum: credit granted to `node_id` for one round (or
    the `span` consecutive rounds its attesters reported together)."""

    job: str
    generation: int
    round: int
    node_id: str
    header: Header
    attesters: int
    registered: bool
    span: int = 1

    @property
    def credit(self) -> int:
        samples, _staleness, _version, accepted, _reason = self.header
        return samples if accepted else 0


@dataclass
class IngestOutcome:
    """What one batch did: a result per report, and what it granted (for the metrics)."""

    results: list[dict[str, Any]]
    grants: list[Grant] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r["status"] == status)


@dataclass
class _Stored:
    members: tuple[str, ...]
    headers: dict[str, Header]
    digest: str
    disputed: bool
    new: bool = False
    span: int = 1


#: per node of a round: the settled header and the span of the reports that settled it
Settled = dict[str, tuple[Header, int]]


def _headers_json(report: RoundReport) -> str:
    return json.dumps([[c.node_id, c.samples, c.staleness, c.param_version, c.accepted,
                        c.reason] for c in report.contributions], separators=(",", ":"))


def _parse_headers(text: str) -> dict[str, Header]:
    return {row[0]: (row[1], row[2], row[3], bool(row[4]), row[5]) for row in json.loads(text)}


class Ledger:
    """Report ingestion and credit granting over a `Storage`."""

    def __init__(self, storage: Storage, *, quorum: int, half_life_seconds: float,
                 clock: Callable[[], float], trust_reported_membership: bool = False,
                 max_samples_per_round: int = 1 << 20, max_span: int = 1024,
                 can_learn_generations: bool = True) -> None:
        self.storage = storage
        self.quorum = quorum
        self.trust_reported_membership = trust_reported_membership
        self.max_samples_per_round = max_samples_per_round
        self.max_span = max_span
        self.can_learn_generations = can_learn_generations
        self.half_life = half_life_seconds
        self.clock = clock
        self._pruned_bucket = -1

    def needed(self, world_size: int) -> int:
        """Agreeing other reporters a header needs in a round of `world_size` members."""
        return min(self.quorum, world_size - 1)

    def ingest(self, reporter: str, batch: Sequence[RoundReport]) -> IngestOutcome:
        """Store `batch` from `reporter` and grant what reached a quorum: one transaction."""
        return self.storage.run_write(lambda conn: self._ingest(conn, reporter, batch))

    # -- the write path ---------------------------------------------------------------

    def _ingest(self, conn: Connection, reporter: str, batch: Sequence[RoundReport]
                ) -> IngestOutcome:
        now = self.clock()
        results: list[dict[str, Any]] = [{"index": i, "status": STORED}
                                         for i in range(len(batch))]
        outcome = IngestOutcome(results)
        digests = [r.digest() for r in batch]
        first_in_batch: dict[RoundKey, int] = {}
        candidates: list[int] = []
        for i, report in enumerate(batch):
            if reporter not in report.members:
                results[i] = {"index": i, "status": REJECTED, "reason": NOT_A_MEMBER,
                              "message": f"{reporter} is not a member of round "
                                         f"{report.round} of generation {report.generation}"}
                continue
            earlier = first_in_batch.get(report.key)
            if earlier is not None:
                same = digests[earlier] == digests[i]
                results[i] = {"index": i, "status": DUPLICATE if same else CONFLICT}
                continue
            over = self._over_limit(report)
            if over:
                results[i] = {"index": i, "status": REJECTED, "reason": OVER_LIMIT,
                              "message": over}
                continue
            first_in_batch[report.key] = i
            candidates.append(i)
        if not candidates:
            return outcome

        # Only generations the rendezvous published (unless reported membership is trusted).
        gen_keys = sorted({(batch[i].job, batch[i].generation) for i in candidates})
        known = self._select_generations(conn, gen_keys, self.trust_reported_membership)
        if not self.trust_reported_membership:
            kept = []
            for i in candidates:
                report = batch[i]
                if (report.job, report.generation) in known:
                    kept.append(i)
                    continue
                results[i] = self._unknown_generation(i, report)
                del first_in_batch[report.key]
            candidates = kept
            if not candidates:
                return outcome

        # Lock (PostgreSQL) or create every touched round, then read its whole state.
        keys = sorted({batch[i].key for i in candidates})
        _driver_many(conn, _SQL_CREATE_ROUND, [
            (k[0], k[1], k[2], now, len(batch[first_in_batch[k]].members),
             batch[first_in_batch[k]].span) for k in keys])
        round_rows = self._select_rounds(conn, keys)
        stored = self._select_reports(conn, keys)
        settled = self._select_credits(conn, keys)

        new_reports: list[int] = []
        for i in candidates:
            report = batch[i]
            have = stored.setdefault(report.key, {})
            if reporter in have:
                same = have[reporter].digest == digests[i]
                results[i] = {"index": i, "status": DUPLICATE if same else CONFLICT}
                continue
            members = known.get((report.job, report.generation))
            if members is not None and report.members != members:
                results[i] = {"index": i, "status": REJECTED, "reason": MEMBERSHIP_MISMATCH,
                              "message": f"the members of generation {report.generation} "
                                         f"of job {report.job} are {list(members)}"}
                continue
            have[reporter] = _Stored(report.members, report.headers(), digests[i], False,
                                     new=True, span=report.span)
            new_reports.append(i)
            if report.timestamp is not None:
                outcome.lags.append(max(0.0, now - report.timestamp))

        # Evaluate every round that got a new report.
        touched = sorted({batch[i].key for i in new_reports})
        established: dict[tuple[str, int], tuple[str, ...]] = {}
        newly_disputed: list[tuple[RoundKey, str]] = []
        for key in touched:
            gen_key = (key[0], key[1])
            members = known.get(gen_key)
            round_settled = settled.setdefault(key, {})
            grants, agreed = self._evaluate(key, stored[key], round_settled, members)
            if grants and members is None and agreed is not None \
                    and self.trust_reported_membership:
                known[gen_key] = agreed
                established[gen_key] = agreed
                members = agreed
            outcome.grants.extend(grants)
            for grant in grants:
                round_settled[grant.node_id] = (grant.header, grant.span)
            for who, rep in stored[key].items():
                if rep.disputed:
                    continue
                if _disputes(rep, members, round_settled):
                    rep.disputed = True
                    newly_disputed.append((key, who))

        # Ledger updates for every node that earned, reported or was caught disagreeing.
        subjects = {g.node_id for g in outcome.grants}
        disputers = Counter(who for _key, who in newly_disputed)
        node_ids = sorted(subjects | set(disputers) | {reporter})
        node_rows = self._select_nodes(conn, node_ids)
        registered = set(node_rows)
        outcome.grants = [Grant(g.job, g.generation, g.round, g.node_id, g.header,
                                g.attesters, g.node_id in registered, g.span)
                          for g in outcome.grants]
        self._write(conn, now, reporter, batch, new_reports, stored, outcome.grants,
                    newly_disputed, node_rows, disputers, round_rows, keys)
        for gen_key, members in established.items():
            note_generation(conn, gen_key[0], gen_key[1], members, "quorum", now)
        return outcome

    def _over_limit(self, report: RoundReport) -> str:
        """Why `report` claims more than any generation allows ("" when it does not)."""
        if report.span > self.max_span:
            return (f"span {report.span} exceeds this coordinator's limit of {self.max_span} "
                    "rounds per report")
        cap = self.max_samples_per_round * report.span
        for c in report.contributions:
            if c.samples > cap:
                return (f"{c.node_id} claims {c.samples} samples in {report.span} round(s); "
                        f"the limit is {self.max_samples_per_round} per round")
        return ""

    def _unknown_generation(self, index: int, report: RoundReport) -> dict[str, Any]:
        """A rejection of a report whose generation the rendezvous has not shown us."""
        if self.can_learn_generations:
            message = (f"generation {report.generation} of job {report.job} is not known from "
                       "the rendezvous (yet); resend the report later")
        else:
            message = ("this coordinator reads no rendezvous, so it cannot verify generation "
                       f"{report.generation} of job {report.job}; configure its rendezvous")
        return {"index": index, "status": REJECTED, "reason": GENERATION_UNKNOWN,
                "message": message, "retry": self.can_learn_generations}

    def _evaluate(self, key: RoundKey, stored: dict[str, _Stored], settled: Settled,
                  members: tuple[str, ...] | None
                  ) -> tuple[list[Grant], tuple[str, ...] | None]:
        """Headers of `key` that reached their quorum now, and the member list they used.

        Voters must agree on the member list and on the span: a report of one round and
        one of several rounds from the same start attest different things.
        """
        if members is not None:
            lists = [members]
        else:
            lists = [m for m, _n in Counter(rep.members for rep in stored.values()).most_common()]
        for candidate in lists:
            needed = self.needed(len(candidate))
            if needed < 1:
                continue
            spans = Counter(rep.span for rep in stored.values() if rep.members == candidate)
            grants: list[Grant] = []
            granted: set[str] = set()
            for span, _n in spans.most_common():
                voters = [(who, rep) for who, rep in stored.items()
                          if rep.members == candidate and rep.span == span]
                if len(voters) < needed:
                    continue
                for node in candidate:
                    if node in settled or node in granted:
                        continue
                    votes = Counter(rep.headers[node] for who, rep in voters if who != node)
                    if not votes:
                        continue
                    ranked = votes.most_common(2)
                    header, count = ranked[0]
                    if count < needed or (len(ranked) > 1 and ranked[1][1] == count):
                        continue
                    grants.append(Grant(key[0], key[1], key[2], node, header, count, False,
                                        span))
                    granted.add(node)
            if grants or members is not None:
                return grants, candidate
            if any(node in settled for node in candidate):
                return [], candidate
        return [], None

    # -- reads under the write transaction --------------------------------------------

    @staticmethod
    def _by_generation(keys: Sequence[RoundKey]) -> list[dict[str, Any]]:
        """Parameters of the prebuilt per-generation queries, in a fixed (lock) order."""
        by_gen: dict[tuple[str, int], list[int]] = {}
        for job, gen, rnd in keys:
            by_gen.setdefault((job, gen), []).append(rnd)
        return [{"job": job, "gen": gen, "rounds": rnds}
                for (job, gen), rnds in sorted(by_gen.items())]

    def _select_rounds(self, conn: Connection, keys: Sequence[RoundKey]) -> dict[RoundKey, Any]:
        out = {}
        for params in self._by_generation(keys):
            for row in conn.execute(_SELECT_ROUNDS, params):
                out[(row.job, row.generation, row.round)] = row
        return out

    def _select_reports(self, conn: Connection, keys: Sequence[RoundKey]
                        ) -> dict[RoundKey, dict[str, _Stored]]:
        out: dict[RoundKey, dict[str, _Stored]] = {}
        for params in self._by_generation(keys):
            for job, gen, rnd, reporter, members, headers, digest, disputed, span in \
                    conn.execute(_SELECT_REPORTS, params):
                out.setdefault((job, gen, rnd), {})[reporter] = _Stored(
                    tuple(json.loads(members)), _parse_headers(headers), digest,
                    bool(disputed), span=int(span))
        return out

    def _select_credits(self, conn: Connection, keys: Sequence[RoundKey]
                        ) -> dict[RoundKey, Settled]:
        out: dict[RoundKey, Settled] = {}
        for params in self._by_generation(keys):
            for job, gen, rnd, node, samples, staleness, version, accepted, reason, span in \
                    conn.execute(_SELECT_CREDITS, params):
                out.setdefault((job, gen, rnd), {})[node] = (
                    (samples, staleness, version, bool(accepted), reason), int(span))
        return out

    @staticmethod
    def _select_generations(conn: Connection, gen_keys: Sequence[tuple[str, int]],
                            any_source: bool) -> dict[tuple[str, int], tuple[str, ...]]:
        """Members of the known generations among `gen_keys`: those the rendezvous
        published (and, when `any_source`, those a quorum of reports established)."""
        out = {}
        for job, gen in gen_keys:
            row = conn.execute(_SELECT_GENERATION, {"job": job, "gen": gen}).first()
            if row is not None and (any_source or row.source == "rendezvous"):
                out[(job, gen)] = tuple(json.loads(row.members))
        return out

    @staticmethod
    def _select_nodes(conn: Connection, node_ids: Sequence[str]) -> dict[str, Any]:
        return {row.node_id: row for row in conn.execute(_SELECT_NODES, {"ids": list(node_ids)})}

    # -- writes -----------------------------------------------------------------------

    def _write(self, conn: Connection, now: float, reporter: str,
               batch: Sequence[RoundReport], new_reports: list[int],
               stored: dict[RoundKey, dict[str, _Stored]], grants: list[Grant],
               newly_disputed: list[tuple[RoundKey, str]], node_rows: dict[str, Any],
               disputers: Counter[str], round_rows: dict[RoundKey, Any],
               keys: Sequence[RoundKey]) -> None:
        if new_reports:
            _driver_many(conn, _SQL_INSERT_REPORT, [
                (batch[i].job, batch[i].generation, batch[i].round, reporter, now,
                 stored[batch[i].key][reporter].digest,
                 json.dumps(list(batch[i].members), separators=(",", ":")),
                 _headers_json(batch[i]), batch[i].loss,
                 stored[batch[i].key][reporter].disputed, batch[i].span) for i in new_reports])
        old_disputed = [(k, who) for k, who in newly_disputed if not stored[k][who].new]
        if old_disputed:
            conn.execute(
                _MARK_DISPUTED,
                [{"k_job": k[0], "k_gen": k[1], "k_round": k[2], "k_reporter": who}
                 for k, who in old_disputed])
        if grants:
            _driver_many(conn, _SQL_INSERT_CREDIT, [
                (g.job, g.generation, g.round, g.node_id, g.credit, g.header[0], g.header[1],
                 g.header[2], g.header[3], g.header[4], g.attesters, g.registered, now, g.span)
                for g in grants])

        # Per-round counters.
        deltas: dict[RoundKey, dict[str, float]] = {}
        for i in new_reports:
            d = deltas.setdefault(batch[i].key, {"reports": 0, "settled": 0, "samples": 0,
                                                 "loss_sum": 0.0, "loss_count": 0})
            d["reports"] += 1
            if batch[i].loss is not None:
                d["loss_sum"] += batch[i].loss
                d["loss_count"] += 1
        for g in grants:
            d = deltas.setdefault((g.job, g.generation, g.round),
                                  {"reports": 0, "settled": 0, "samples": 0,
                                   "loss_sum": 0.0, "loss_count": 0})
            d["settled"] += 1
            d["samples"] += g.credit
        if deltas:
            _driver_many(conn, _SQL_COUNT_ROUND, [
                (d["reports"], d["settled"], d["samples"], d["loss_sum"], d["loss_count"],
                 k[0], k[1], k[2]) for k, d in sorted(deltas.items())])
        # Rounds created for reports that were then refused hold nothing: drop them.
        empty = [k for k in keys if k not in deltas and (
            k not in round_rows or round_rows[k].reports == 0)]
        for job, gen, rnd in empty:
            conn.execute(delete(rounds).where(
                rounds.c.job == job, rounds.c.generation == gen, rounds.c.round == rnd,
                rounds.c.reports == 0))

        # Node totals (rows locked above, so absolute values are safe to write).
        changes: dict[str, dict[str, Any]] = {}

        def row_of(node_id: str) -> dict[str, Any] | None:
            if node_id not in node_rows:
                return None
            if node_id not in changes:
                changes[node_id] = dict(node_rows[node_id]._mapping)
            return changes[node_id]

        mine = row_of(reporter)
        if mine is not None and new_reports:
            mine["reports"] += len(new_reports)
            mine["last_report_at"] = now
        for g in grants:
            row = row_of(g.node_id)
            if row is None:
                continue
            samples, staleness, _version, accepted, reason = g.header
            if accepted:
                row["credit_total"] += g.credit
                row["rac"] = rac_after(row["rac"], row["rac_time"], g.credit, now,
                                       self.half_life)
                row["rac_time"] = now
                row["contributions_accepted"] += g.span
                row["staleness_sum"] += staleness * g.span
            else:
                row["contributions_refused"] += g.span
                if reason in STRIKE_REASONS:
                    row["strikes"] += 1
        for node_id, count in disputers.items():
            row = row_of(node_id)
            if row is not None:
                row["disputes"] += count
        if changes:
            conn.execute(
                _UPDATE_NODES,
                [{"k_node": node_id, **{f"v_{c}": row[c] for c in _NODE_TOTALS}}
                 for node_id, row in sorted(changes.items())])

        # Recent rates (per node and per job), and old buckets dropped once per bucket.
        amounts: Counter[tuple[str, str]] = Counter()
        for g in grants:
            if g.credit:
                amounts[("job", g.job)] += g.credit
                if g.registered:
                    amounts[("node", g.node_id)] += g.credit
        add_rates(conn, now, amounts)
        bucket = int(now // RATE_BUCKET)
        if amounts and bucket != self._pruned_bucket:
            conn.execute(delete(rates).where(rates.c.bucket < bucket - int(RATE_KEEP //
                                                                           RATE_BUCKET)))
            self._pruned_bucket = bucket

        # Job counters.
        job_deltas: dict[str, dict[str, int]] = {}
        for k, d in deltas.items():
            jd = job_deltas.setdefault(k[0], {"rounds": 0, "reports": 0, "samples": 0})
            jd["reports"] += int(d["reports"])
            jd["samples"] += int(d["samples"])
            if d["reports"] and (k not in round_rows or round_rows[k].reports == 0):
                jd["rounds"] += round_rows[k].span if k in round_rows else 1
        for job, jd in sorted(job_deltas.items()):
            ensure_job(conn, job, now)
            conn.execute(_UPDATE_JOB, {
                "k_job": job, "d_rounds": jd["rounds"], "d_reports": jd["reports"],
                "d_samples": jd["samples"], "v_last": now if jd["reports"] else None})


def _disputes(rep: _Stored, members: tuple[str, ...] | None, settled: Settled) -> bool:
    """Whether a stored report contradicts what its round agreed on (for the same span:
    members whose generation ended mid-span report its rounds one by one, honestly)."""
    if members is not None and rep.members != members:
        return True
    return any(rep.headers.get(node, header) != header
               for node, (header, span) in settled.items() if span == rep.span)


def ensure_job(conn: Connection, job: str, now: float) -> None:
    conn.execute(insert_ignore(conn, jobs), [{"job": job, "first_seen": now}])


def add_event(conn: Connection, now: float, kind: str, *, job: str | None = None,
              node_id: str | None = None, generation: int | None = None, detail: str = "",
              dedupe: str | None = None) -> None:
    """Append to the timeline; an event with a `dedupe` key already present is skipped."""
    conn.execute(insert_ignore(conn, events), [{
        "time": now, "job": job, "kind": kind, "node_id": node_id,
        "generation": generation, "detail": detail, "dedupe": dedupe}])


def note_generation(conn: Connection, job: str, generation: int, members: Sequence[str],
                    source: str, now: float) -> None:
    """Record a generation's members and, when it is the job's newest, its joins/departures.

    `source` is "rendezvous" (authoritative: replaces a quorum's record) or "quorum".
    """
    members = tuple(members)
    text = json.dumps(list(members), separators=(",", ":"))
    existing = conn.execute(select(generations.c.members, generations.c.source).where(
        generations.c.job == job, generations.c.generation == generation)).first()
    if existing is None:
        conn.execute(insert_ignore(conn, generations), [{
            "job": job, "generation": generation, "members": text, "source": source,
            "seen_at": now}])
    elif source == "rendezvous" and (existing.source != source or existing.members != text):
        conn.execute(update(generations).where(
            generations.c.job == job, generations.c.generation == generation).values(
            members=text, source=source))
    ensure_job(conn, job, now)
    row = conn.execute(select(jobs.c.generation, jobs.c.members).where(jobs.c.job == job)
                       .with_for_update()).one()
    if row.generation is not None and row.generation >= generation:
        return
    before = tuple(json.loads(row.members)) if row.generation is not None else ()
    conn.execute(update(jobs).where(jobs.c.job == job).values(generation=generation,
                                                              members=text))
    add_event(conn, now, "generation", job=job, generation=generation,
              detail=f"{len(members)} member(s), seen via {source}",
              dedupe=f"gen:{job}:{generation}")
    for node in members:
        if node not in before:
            add_event(conn, now, "joined", job=job, node_id=node, generation=generation,
                      dedupe=f"join:{job}:{generation}:{node}")
    for node in before:
        if node not in members:
            add_event(conn, now, "left", job=job, node_id=node, generation=generation,
                      dedupe=f"left:{job}:{generation}:{node}")
