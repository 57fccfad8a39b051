"""Job logs compressed, and counted per job against a budget: log_chunks keep their lines as
zlib-compressed JSON (`packed`) with its uncompressed size (`raw_bytes`); `log_totals` holds
what each job's log stored and dropped.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import zlib

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_chunks = sa.table(
    "log_chunks",
    sa.column("id", sa.BigInteger()),
    sa.column("job_id", sa.String()),
    sa.column("lines", sa.Text()),
    sa.column("packed", sa.LargeBinary()),
    sa.column("raw_bytes", sa.Integer()),
)
_PAGE = 500


def upgrade() -> None:
    op.create_table(
        "log_totals",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("dropped_lines", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("dropped_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_log_totals")),
    )
    with op.batch_alter_table("log_chunks") as batch:
        batch.add_column(sa.Column("packed", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("raw_bytes", sa.Integer(), nullable=True))
    # The chunks written so far, compressed a page at a time (never the whole table at once).
    conn = op.get_bind()
    last = -1
    while True:
        rows = conn.execute(
            sa.select(_chunks.c.id, _chunks.c.lines)
            .where(_chunks.c.id > last)
            .order_by(_chunks.c.id)
            .limit(_PAGE)
        ).all()
        for chunk_id, lines in rows:
            raw = lines.encode()
            conn.execute(
                _chunks.update()
                .where(_chunks.c.id == chunk_id)
                .values(packed=zlib.compress(raw, 1), raw_bytes=len(raw), lines="")
            )
        if len(rows) < _PAGE:
            break
        last = rows[-1].id
    # What the existing logs already stored counts against their jobs' budgets.
    op.execute(
        "INSERT INTO log_totals (job_id, stored_bytes, dropped_lines, dropped_bytes) "
        "SELECT job_id, SUM(raw_bytes), 0, 0 FROM log_chunks GROUP BY job_id"
    )
    with op.batch_alter_table("log_chunks") as batch:
        batch.drop_column("lines")
        batch.alter_column("packed", existing_type=sa.LargeBinary(), nullable=False)
        batch.alter_column("raw_bytes", existing_type=sa.Integer(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("log_chunks") as batch:
        batch.add_column(sa.Column("lines", sa.Text(), server_default="[]", nullable=False))
    conn = op.get_bind()
    last = -1
    while True:
        rows = conn.execute(
            sa.select(_chunks.c.id, _chunks.c.packed)
            .where(_chunks.c.id > last)
            .order_by(_chunks.c.id)
            .limit(_PAGE)
        ).all()
        for chunk_id, packed in rows:
            conn.execute(
                _chunks.update()
                .where(_chunks.c.id == chunk_id)
                .values(lines=zlib.decompress(packed).decode())
            )
        if len(rows) < _PAGE:
            break
        last = rows[-1].id
    with op.batch_alter_table("log_chunks") as batch:
        batch.drop_column("raw_bytes")
        batch.drop_column("packed")
        batch.alter_column("lines", server_default=None)
    op.drop_table("log_totals")
