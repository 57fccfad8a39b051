"""The worker pool: a job's priority, min_workers and what it waits for; what each worker holds
of the pool's capacity, and whether it was asked to drain.

Revision ID: 0012
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("min_workers", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(
            sa.Column("pending_workers", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("pending_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("cpu", sa.Float(), server_default="0", nullable=False))
        batch.add_column(sa.Column("mem", sa.BigInteger(), server_default="0", nullable=False))
        batch.add_column(sa.Column("gpu", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(
            sa.Column("draining", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        for name in ("draining", "gpu", "mem", "cpu"):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        for name in ("pending_reason", "pending_workers", "min_workers", "priority"):
            batch.drop_column(name)
