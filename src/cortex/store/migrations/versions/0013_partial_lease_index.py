"""The lease-expiry index holds leased batches only: writing a job's queued batches no longer
updates it, and it stays as small as the batches leased at one time.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_LEASED = sa.text("state = 'leased'")


def upgrade() -> None:
    op.drop_index("ix_batches_lease", table_name="batches")
    op.create_index(
        "ix_batches_lease",
        "batches",
        ["lease_expires_at"],
        sqlite_where=_LEASED,
        postgresql_where=_LEASED,
    )


def downgrade() -> None:
    op.drop_index("ix_batches_lease", table_name="batches")
    op.create_index("ix_batches_lease", "batches", ["state", "lease_expires_at"])
