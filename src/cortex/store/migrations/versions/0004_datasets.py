"""File datasets: the dataset of a job, and the cursor that lets its enqueuing resume.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dataset_json", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("enqueued_items", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("enqueue_owner", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueue_owner")
        batch.drop_column("enqueued_items")
        batch.drop_column("dataset_json")
