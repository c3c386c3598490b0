"""Initial ledger schema: nodes, jobs, generations, rounds, reports, credits, rates, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("display_name", sa.String(64), nullable=False, server_default=""),
        sa.Column("owner", sa.String(64), nullable=False, server_default=""),
        sa.Column("hardware", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=False),
        sa.Column("last_report_at", sa.Float(), nullable=True),
        sa.Column("credit_total", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("rac", sa.Float(), nullable=False, server_default="0"),
        sa.Column("rac_time", sa.Float(), nullable=False, server_default="0"),
        sa.Column("contributions_accepted", sa.BigInteger(), nullable=False,
                  server_default="0"),
        sa.Column("contributions_refused", sa.BigInteger(), nullable=False,
                  server_default="0"),
        sa.Column("staleness_sum", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("strikes", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("disputes", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("reports", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("node_id", name="pk_nodes"),
    )
    op.create_table(
        "jobs",
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_report_at", sa.Float(), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=True),
        sa.Column("members", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("rounds", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reports", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("samples_credited", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("job", name="pk_jobs"),
    )
    op.create_table(
        "generations",
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("members", sa.Text(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job", "generation", name="pk_generations"),
    )
    op.create_table(
        "rounds",
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("round", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("first_report_at", sa.Float(), nullable=False),
        sa.Column("world_size", sa.Integer(), nullable=False),
        sa.Column("reports", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("settled", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("samples", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("loss_sum", sa.Float(), nullable=False, server_default="0"),
        sa.Column("loss_count", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("job", "generation", "round", name="pk_rounds"),
    )
    op.create_index("ix_rounds_job_first_report_at", "rounds", ["job", "first_report_at"])
    op.create_table(
        "reports",
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("round", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("reporter", sa.String(128), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("digest", sa.String(32), nullable=False),
        sa.Column("members", sa.Text(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("disputed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("job", "generation", "round", "reporter", name="pk_reports"),
    )
    op.create_table(
        "credits",
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("round", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("staleness", sa.Integer(), nullable=False),
        sa.Column("param_version", sa.BigInteger(), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=True),
        sa.Column("attesters", sa.Integer(), nullable=False),
        sa.Column("registered", sa.Boolean(), nullable=False),
        sa.Column("granted_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job", "generation", "round", "node_id", name="pk_credits"),
    )
    op.create_index("ix_credits_node_id_granted_at", "credits", ["node_id", "granted_at"])
    op.create_index("ix_credits_job_granted_at", "credits", ["job", "granted_at"])
    op.create_table(
        "rates",
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", "bucket", name="pk_rates"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("job", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("node_id", sa.String(128), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False, server_default=""),
        sa.Column("dedupe", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("dedupe", name="uq_events_dedupe"),
    )
    op.create_index("ix_events_job_id", "events", ["job", "id"])


def downgrade() -> None:
    op.drop_index("ix_events_job_id", table_name="events")
    op.drop_table("events")
    op.drop_table("rates")
    op.drop_index("ix_credits_job_granted_at", table_name="credits")
    op.drop_index("ix_credits_node_id_granted_at", table_name="credits")
    op.drop_table("credits")
    op.drop_table("reports")
    op.drop_index("ix_rounds_job_first_report_at", table_name="rounds")
    op.drop_table("rounds")
    op.drop_table("generations")
    op.drop_table("jobs")
    op.drop_table("nodes")
