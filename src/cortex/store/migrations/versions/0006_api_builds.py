"""API versions whose environment is being built: the pending version and its build error.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("apis") as batch:
        batch.add_column(sa.Column("pending_spec_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("pending_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("apis") as batch:
        batch.drop_column("pending_error")
        batch.drop_column("pending_spec_id")
