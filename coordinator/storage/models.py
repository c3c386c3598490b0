"""The ledger's tables (SQLAlchemy Core). Alembic migrations create them; this module
describes them for queries, and a test checks that the two agree.

Times are Unix seconds as floats (portable across SQLite and PostgreSQL); JSON columns
are text. Node ids and job names are validated before they get here.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

#: one row per registered node: identity, token hash and the running ledger totals
nodes = Table(
    "nodes", metadata,
    Column("node_id", String(128), primary_key=True),
    Column("display_name", String(64), nullable=False, server_default=""),
    Column("owner", String(64), nullable=False, server_default=""),
    Column("hardware", Text, nullable=False, server_default="{}"),
    Column("token_hash", String(64), nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("last_report_at", Float, nullable=True),
    Column("credit_total", BigInteger, nullable=False, server_default="0"),
    Column("rac", Float, nullable=False, server_default="0"),
    Column("rac_time", Float, nullable=False, server_default="0"),
    Column("contributions_accepted", BigInteger, nullable=False, server_default="0"),
    Column("contributions_refused", BigInteger, nullable=False, server_default="0"),
    Column("staleness_sum", BigInteger, nullable=False, server_default="0"),
    Column("strikes", Integer, nullable=False, server_default="0"),
    Column("disputes", Integer, nullable=False, server_default="0"),
    Column("reports", BigInteger, nullable=False, server_default="0"),
)

#: one row per job that ever reported: counters for the status page
jobs = Table(
    "jobs", metadata,
    Column("job", String(64), primary_key=True),
    Column("first_seen", Float, nullable=False),
    Column("last_report_at", Float, nullable=True),
    Column("generation", BigInteger, nullable=True),
    Column("members", Text, nullable=False, server_default="[]"),
    Column("rounds", BigInteger, nullable=False, server_default="0"),
    Column("reports", BigInteger, nullable=False, server_default="0"),
    Column("samples_credited", BigInteger, nullable=False, server_default="0"),
)

#: a generation's members once known: from the rendezvous, or agreed by a quorum
generations = Table(
    "generations", metadata,
    Column("job", String(64), primary_key=True),
    Column("generation", BigInteger, primary_key=True, autoincrement=False),
    Column("members", Text, nullable=False),
    Column("source", String(16), nullable=False),
    Column("seen_at", Float, nullable=False),
)

#: one row per round that got at least one report (a span of `span` rounds from `round`
#: when its first report coalesced consecutive synchronous steps)
rounds = Table(
    "rounds", metadata,
    Column("job", String(64), primary_key=True),
    Column("generation", BigInteger, primary_key=True, autoincrement=False),
    Column("round", BigInteger, primary_key=True, autoincrement=False),
    Column("first_report_at", Float, nullable=False),
    Column("world_size", Integer, nullable=False),
    Column("span", Integer, nullable=False, server_default="1"),
    Column("reports", Integer, nullable=False, server_default="0"),
    Column("settled", Integer, nullable=False, server_default="0"),
    Column("samples", BigInteger, nullable=False, server_default="0"),
    Column("loss_sum", Float, nullable=False, server_default="0"),
    Column("loss_count", Integer, nullable=False, server_default="0"),
    Index("ix_rounds_job_first_report_at", "job", "first_report_at"),
)

#: every stored report, once per (job, generation, round, reporter): the idempotence key;
#: it covers `span` consecutive rounds from `round`
reports = Table(
    "reports", metadata,
    Column("job", String(64), primary_key=True),
    Column("generation", BigInteger, primary_key=True, autoincrement=False),
    Column("round", BigInteger, primary_key=True, autoincrement=False),
    Column("reporter", String(128), primary_key=True),
    Column("received_at", Float, nullable=False),
    Column("digest", String(32), nullable=False),
    Column("members", Text, nullable=False),
    Column("headers", Text, nullable=False),
    Column("loss", Float, nullable=True),
    Column("disputed", Boolean, nullable=False, server_default=false()),
    Column("span", Integer, nullable=False, server_default="1"),
)

#: a settled header per (round, node): granted once, never revised (for the `span` rounds
#: the attesting reports covered)
credits = Table(
    "credits", metadata,
    Column("job", String(64), primary_key=True),
    Column("generation", BigInteger, primary_key=True, autoincrement=False),
    Column("round", BigInteger, primary_key=True, autoincrement=False),
    Column("node_id", String(128), primary_key=True),
    Column("credit", BigInteger, nullable=False),
    Column("samples", BigInteger, nullable=False),
    Column("staleness", Integer, nullable=False),
    Column("param_version", BigInteger, nullable=False),
    Column("accepted", Boolean, nullable=False),
    Column("reason", String(16), nullable=True),
    Column("attesters", Integer, nullable=False),
    Column("registered", Boolean, nullable=False),
    Column("granted_at", Float, nullable=False),
    Column("span", Integer, nullable=False, server_default="1"),
    Index("ix_credits_node_id_granted_at", "node_id", "granted_at"),
    Index("ix_credits_job_granted_at", "job", "granted_at"),
)

#: credit granted per node and per job in short time buckets: cheap recent rates
rates = Table(
    "rates", metadata,
    Column("scope", String(8), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("bucket", BigInteger, primary_key=True, autoincrement=False),
    Column("credit", BigInteger, nullable=False),
)

#: the timeline: registrations, joins, departures, evictions, new generations
events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("job", String(64), nullable=True),
    Column("kind", String(16), nullable=False),
    Column("node_id", String(128), nullable=True),
    Column("generation", BigInteger, nullable=True),
    Column("detail", Text, nullable=False, server_default=""),
    Column("dedupe", String(200), nullable=True, unique=True),
    Index("ix_events_job_id", "job", "id"),
)
