"""Batch payloads in a table of their own, so that updating a batch's state does not rewrite
its payload (SQLite rewrites whole rows); batches keep the payload's size.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_payloads",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq"),
    )
    op.execute(
        "INSERT INTO batch_payloads (job_id, seq, payload) SELECT job_id, seq, payload FROM batches"
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("payload_size", sa.Integer(), server_default="0", nullable=False)
        )
    op.execute("UPDATE batches SET payload_size = length(payload)")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("payload")


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("payload", sa.Text(), server_default="[]", nullable=False))
    op.execute(
        "UPDATE batches SET payload = (SELECT p.payload FROM batch_payloads p "
        "WHERE p.job_id = batches.job_id AND p.seq = batches.seq)"
    )
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("payload_size")
        batch.alter_column("payload", server_default=None)
    op.drop_table("batch_payloads")
