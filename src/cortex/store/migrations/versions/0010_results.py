"""Collected results and per-job limits: `batch_results` holds what `predict` returned; jobs
get `batch_timeout_s`, `max_failed_batches` and `output_json`; batches a `deadline_at`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_results",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("lines", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_batch_results")),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_timeout_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_failed_batches", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("output_json", sa.Text(), nullable=True))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("deadline_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("deadline_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("output_json")
        batch.drop_column("max_failed_batches")
        batch.drop_column("batch_timeout_s")
    op.drop_table("batch_results")
