"""Retention: ended jobs leave the store with everything they hold (batches, payloads, workers,
logs) once `CORTEX_JOB_RETENTION_S` has passed, a bounded chunk of rows a transaction, so that
removing a job of a million batches never holds the write lock (and every lease) for long.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.store import apis, engine, jobrows
from cortex.store import tables as t

# What one transaction deletes of each table: rows of log chunks and payloads can be a MiB
# each, batch and worker rows are small.
_CHUNK_ROWS: tuple[tuple[sa.Table, tuple[str, ...], int], ...] = (
    (t.log_chunks, ("id",), 64),
    (t.batch_payloads, ("job_id", "seq"), 256),
    (t.batch_results, ("job_id", "seq"), 256),
    (t.batches, ("job_id", "seq"), 5000),
    (t.workers, ("worker_id",), 5000),
    (t.worker_replies, ("worker_id", "channel"), 5000),
    (t.job_metadata, ("job_id", "key"), 5000),
    (t.webhook_deliveries, ("delivery_id",), 5000),
)
# Jobs looked at per call: the reconciler comes back for the rest.
_JOBS_PER_PASS = 100


class RetentionStore(engine.BaseStore):
    """`Store`'s pruning of ended jobs."""

    def prune_jobs(self, ended_before_ts: float, max_transactions: int = 200) -> list[str]:
        """Delete the jobs that ended before `ended_before_ts`, oldest first, and the versions
        of their APIs that nothing refers to any more. A job's rows go a chunk per
        transaction, its own row last (until then it reads as the ended job it is). Stops
        after `max_transactions`; returns the ids of the jobs that are gone."""
        with self.read() as conn:
            old = [
                (row.job_id, row.api_name)
                for row in conn.execute(
                    sa.select(t.jobs.c.job_id, t.jobs.c.api_name)
                    .where(t.jobs.c.end_time < ended_before_ts)
                    .order_by(t.jobs.c.end_time)
                    .limit(_JOBS_PER_PASS)
                )
            ]
        gone: list[str] = []
        left = max_transactions
        for job_id, _ in old:
            while left > 0:
                left -= 1
                with self.write() as conn:
                    if _prune_step(conn, job_id):
                        gone.append(job_id)
                        break
            if left <= 0:
                break
        self.worker_jobs.forget(gone)
        for api_name in sorted({api for job_id, api in old if job_id in gone}):
            with self.write() as conn:
                _drop_unused_versions(conn, api_name)
        return gone


def _prune_step(conn: Connection, job_id: str) -> bool:
    """One chunk of a job's rows; True once the job itself is gone (or was already)."""
    # The job row first (the lock order every writer follows): a worker of a job this old
    # is long gone, but its late report must not interleave with the deletes.
    if jobrows.lock(conn, job_id, missing_ok=True) is None:
        return True
    for table, key, rows in _CHUNK_ROWS:
        columns = [table.c[name] for name in key]
        chunk = sa.select(*columns).where(table.c.job_id == job_id).limit(rows)
        target = columns[0] if len(columns) == 1 else sa.tuple_(*columns)
        if conn.execute(table.delete().where(target.in_(chunk))).rowcount:
            return False
    conn.execute(t.log_totals.delete().where(t.log_totals.c.job_id == job_id))
    conn.execute(t.jobs.delete().where(t.jobs.c.job_id == job_id))
    return True


def _drop_unused_versions(conn: Connection, api_name: str) -> None:
    """The API's versions (their archives) that neither the API nor a job refers to. Under
    the API's row lock: a job being created holds it too, and takes the API's own version."""
    row = apis.lock(conn, api_name)
    if row is None:
        return
    in_use = sa.select(t.jobs.c.spec_id).where(t.jobs.c.api_name == api_name)
    kept = [spec for spec in (row.spec_id, row.pending_spec_id) if spec is not None]
    conn.execute(
        t.api_specs.delete().where(
            t.api_specs.c.api_name == api_name,
            t.api_specs.c.spec_id.not_in(kept),
            t.api_specs.c.spec_id.not_in(in_use),
        )
    )
