"""The worker protocol's last answer per worker and channel, for requests sent again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_replies",
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(8), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.Column("final", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", "channel", name=op.f("pk_worker_replies")),
    )
    op.create_index("ix_worker_replies_job_id", "worker_replies", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_worker_replies_job_id", table_name="worker_replies")
    op.drop_table("worker_replies")
