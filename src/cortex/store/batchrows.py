"""Batch rows and their payloads: writing a job's batches, reading its failed ones back, and
deleting the payloads that are no longer needed. Leasing them is `queue`'s."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.jobs import BatchState, JobStatus, new_batch_ids
from cortex.store import engine
from cortex.store import tables as t
from cortex.store.prepared import Prepared

INSERT_CHUNK = 2000


class BatchStore(engine.BaseStore):
    """`Store`'s failed-batch reads and payload pruning."""

    def prune_payloads(self, chunk: int = 5000, max_chunks: int = 20) -> int:
        """Delete the payloads of the succeeded batches of ended jobs (the failed ones stay,
        for `retry_failed` and the failed-batch listing), `chunk` rows a transaction so that
        workers' leases are not held up. Returns how many went."""
        terminal = [s.value for s in JobStatus if s.terminal]
        deleted = 0
        for _ in range(max_chunks):
            done = (
                sa.select(t.batch_payloads.c.job_id, t.batch_payloads.c.seq)
                .join(t.batches, payload_of_batch)
                .join(t.jobs, t.jobs.c.job_id == t.batches.c.job_id)
                .where(
                    t.jobs.c.status.in_(terminal),
                    t.batches.c.state == BatchState.SUCCEEDED.value,
                )
                .limit(chunk)
            )
            with self.write() as conn:
                count = conn.execute(
                    t.batch_payloads.delete().where(
                        sa.tuple_(t.batch_payloads.c.job_id, t.batch_payloads.c.seq).in_(done)
                    )
                ).rowcount
            deleted += count
            if count < chunk:
                break
        return deleted

    def stored_payload(self, job_id: str, batch_id: str) -> bytes | None:
        """One batch's payload as stored (UTF-8 bytes), None if there is none."""
        with self.read() as conn:
            row = conn.execute(
                sa.select(payload_bytes(conn))
                .select_from(t.batches)
                .join(t.batch_payloads, payload_of_batch)
                .where(t.batches.c.job_id == job_id, t.batches.c.batch_id == batch_id)
            ).first()
        return None if row is None else bytes(row.payload)

    def failed_payloads(self, job_id: str) -> Iterator[str]:
        """The payloads of a job's failed batches, in order, read in pages."""
        last = -1
        while True:
            with self.read() as conn:
                rows = conn.execute(
                    sa.select(t.batches.c.seq, t.batch_payloads.c.payload)
                    .join(t.batch_payloads, payload_of_batch)
                    .where(
                        t.batches.c.job_id == job_id,
                        # Batches a spent failure budget left unrun are re-run too.
                        t.batches.c.state.in_([BatchState.FAILED.value, BatchState.NOT_RUN.value]),
                        t.batches.c.seq > last,
                    )
                    .order_by(t.batches.c.seq)
                    .limit(INSERT_CHUNK)
                ).all()
            if not rows:
                return
            for row in rows:
                yield row.payload
            last = rows[-1].seq

    def failed_batches(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.read() as conn:
            return failed_records(conn, job_id, [BatchState.FAILED], limit)


# -- helpers that run inside a caller's transaction ---------------------------------------------


# A job's batches are written 2,000 a statement, millions for a big submission: tuples
# straight to the driver (see `prepared`).
_INSERT_BATCHES = Prepared(
    t.batches.insert().values(
        job_id=sa.bindparam("j"),
        seq=sa.bindparam("s"),
        batch_id=sa.bindparam("b"),
        state=BatchState.QUEUED.value,
        payload_size=sa.bindparam("n"),
    ),
    "j",
    "s",
    "b",
    "n",
)
_INSERT_PAYLOADS = Prepared(
    t.batch_payloads.insert().values(
        job_id=sa.bindparam("j"), seq=sa.bindparam("s"), payload=sa.bindparam("p")
    ),
    "j",
    "s",
    "p",
)


def insert(
    conn: Connection,
    job_id: str,
    start: int,
    payloads: Sequence[str],
    sizes: Sequence[int] | None = None,
) -> None:
    """Write queued batches `start`, `start + 1`, ... with these payloads (and sizes, where
    they are not the payloads' lengths: a reference's is that of the lines it names)."""
    seqs = range(start, start + len(payloads))
    jobs = itertools.repeat(job_id)
    batch_ids = new_batch_ids(len(payloads))
    lengths = map(len, payloads) if sizes is None else sizes
    _INSERT_BATCHES.run_many(conn, list(zip(jobs, seqs, batch_ids, lengths, strict=False)))
    _INSERT_PAYLOADS.run_many(conn, list(zip(jobs, seqs, payloads, strict=False)))


# A payload as UTF-8 bytes, as the database hands them over: a lease answer splices megabytes
# of payloads, and decoding them to text only to encode them again cost a third of the
# lease's time.
PAYLOAD_BYTES: dict[str, sa.ColumnElement[bytes]] = {
    "sqlite": sa.cast(t.batch_payloads.c.payload, sa.LargeBinary).label("payload"),
    "postgresql": sa.func.convert_to(
        t.batch_payloads.c.payload, "UTF8", type_=sa.LargeBinary
    ).label("payload"),
}


def payload_bytes(conn: Connection) -> sa.ColumnElement[bytes]:
    """A payload as UTF-8 bytes (`PAYLOAD_BYTES`) in this connection's dialect."""
    return PAYLOAD_BYTES[conn.dialect.name]


payload_of_batch = sa.and_(
    t.batch_payloads.c.job_id == t.batches.c.job_id, t.batch_payloads.c.seq == t.batches.c.seq
)


def failed_records(
    conn: Connection, job_id: str, states: list[BatchState], limit: int, after_seq: int = -1
) -> list[dict[str, Any]]:
    """A page of a job's batches in `states` (failed; not run), in the job's order after
    `after_seq`: id, place, state, attempts, error kind, message, traceback and payload."""
    rows = conn.execute(
        sa.select(
            t.batches.c.batch_id,
            t.batches.c.seq,
            t.batches.c.state,
            t.batches.c.attempts,
            t.batches.c.error_kind,
            t.batches.c.error_message,
            t.batches.c.error_traceback,
            t.batch_payloads.c.payload,
        )
        .join(t.batch_payloads, payload_of_batch)
        .where(
            t.batches.c.job_id == job_id,
            t.batches.c.state.in_([state.value for state in states]),
            t.batches.c.seq > after_seq,
        )
        .order_by(t.batches.c.seq)
        .limit(limit)
    ).all()
    return [
        {
            "batch_id": row.batch_id,
            "index": row.seq,
            "state": row.state,
            "attempts": row.attempts,
            "error_kind": row.error_kind,
            "error": row.error_message,
            "traceback": row.error_traceback,
            "payload": json.loads(row.payload),
        }
        for row in rows
    ]
