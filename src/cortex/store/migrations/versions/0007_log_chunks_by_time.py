"""Log chunks indexed by their first line's time: an ended job's log is read in time order.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_log_chunks_job_first_ts", "log_chunks", ["job_id", "first_ts", "id"])


def downgrade() -> None:
    op.drop_index("ix_log_chunks_job_first_ts", table_name="log_chunks")
