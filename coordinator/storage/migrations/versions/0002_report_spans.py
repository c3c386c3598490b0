"""Reports may cover a span of consecutive rounds (synchronous steps reported together).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("span", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("span", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("credits") as batch:
        batch.add_column(sa.Column("span", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("credits") as batch:
        batch.drop_column("span")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("span")
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("span")
