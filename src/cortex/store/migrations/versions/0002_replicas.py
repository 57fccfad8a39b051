"""Server replicas: their registrations, the leader lease, and which replica owns a worker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("replica_id", name=op.f("pk_replicas")),
    )
    op.create_table(
        "leadership",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("replica_id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leadership")),
    )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("replica_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("seen_at", sa.Float(), nullable=True))
        batch.create_index("ix_workers_state", ["state"])


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_index("ix_workers_state")
        batch.drop_column("seen_at")
        batch.drop_column("replica_id")
    op.drop_table("leadership")
    op.drop_table("replicas")
