"""The first schema: APIs and their specs, jobs, batches (the queue), workers.

It is the schema `metadata.create_all` made before there were migrations; a database made that
way is stamped with this revision by `cortex migrate` and upgraded from here.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "apis",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("spec_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_apis")),
    )
    op.create_table(
        "api_specs",
        sa.Column("spec_id", sa.String(64), nullable=False),
        sa.Column("api_name", sa.String(64), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("archive", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("spec_id", name=op.f("pk_api_specs")),
    )
    op.create_index(op.f("ix_api_specs_api_name"), "api_specs", ["api_name"])
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("api_name", sa.String(64), nullable=False),
        sa.Column("spec_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("workers", sa.Integer(), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=True),
        sa.Column("timeout_s", sa.Integer(), nullable=True),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("start_time", sa.Float(), nullable=False),
        sa.Column("end_time", sa.Float(), nullable=True),
        sa.Column("total_batch_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("succeeded", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("succeeded_time_s", sa.Float(), server_default="0", nullable=False),
        sa.Column("enqueue_done", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("has_hook", sa.Boolean(), nullable=True),
        sa.Column("completion_state", sa.String(16), nullable=True),
        sa.Column("completion_worker", sa.String(64), nullable=True),
        sa.Column("error_kind", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.Column("worker_token", sa.String(64), nullable=False),
        sa.Column("retry_of", sa.String(32), nullable=True),
        sa.Column("worker_restarts", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_jobs")),
    )
    op.create_index("ix_jobs_api_start", "jobs", ["api_name", "start_time"])
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_table(
        "batches",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("error_kind", sa.String(32), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_batches")),
        sa.UniqueConstraint("batch_id", name=op.f("uq_batches_batch_id")),
    )
    op.create_index("ix_batches_job_state_seq", "batches", ["job_id", "state", "seq"])
    op.create_index("ix_batches_lease", "batches", ["state", "lease_expires_at"])
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_job_id"), "workers", ["job_id"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("batches")
    op.drop_table("jobs")
    op.drop_table("api_specs")
    op.drop_table("apis")
