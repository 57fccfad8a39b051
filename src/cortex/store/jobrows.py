"""Job rows: reading, listing and counting them, and the status transitions, under the job row
lock that every write about a job takes first (see `sql`'s docstring for the rules).
"""

from __future__ import annotations

import time
from typing import Any, Literal, overload

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex import errors
from cortex.jobs import BatchState, JobStatus, WorkerState, can_transition
from cortex.store import budget, engine, outbox, tokens
from cortex.store import tables as t
from cortex.store.records import Job

# A job, its batches by state and (while it runs) its workers by state.
JobProgress = tuple[Job, dict[str, int], dict[str, int] | None]


class JobStore(engine.BaseStore):
    """`Store`'s job reads, listings, progress counts and status changes."""

    def get_job(self, job_id: str) -> Job | None:
        with self.read() as conn:
            row = conn.execute(sa.select(t.jobs).where(t.jobs.c.job_id == job_id)).first()
        return None if row is None else Job.from_row(row)

    def worker_job(self, job_id: str) -> tokens.WorkerJob | None:
        """The job's id, API and worker token (None if there is no such job), kept in memory
        once read: they never change (`tokens`)."""
        return self.worker_jobs.load(job_id, lambda: self._read_worker_job(job_id))

    def _read_worker_job(self, job_id: str) -> tokens.WorkerJob | None:
        with self.read() as conn:
            row = conn.execute(_WORKER_JOB, {"j": job_id}).first()
        return None if row is None else tokens.WorkerJob(row.job_id, row.api_name, row.worker_token)

    def list_jobs(
        self, api_name: str, limit: int = 100, metadata: dict[str, str] | None = None
    ) -> list[Job]:
        """In-progress jobs first, then the newest others, at most `limit` in all; only those
        whose metadata holds every key and value of `metadata`."""
        in_progress = [s.value for s in JobStatus if s.in_progress]
        where = [t.jobs.c.api_name == api_name]
        for key, value in (metadata or {}).items():
            where.append(
                t.jobs.c.job_id.in_(
                    sa.select(t.job_metadata.c.job_id).where(
                        t.job_metadata.c.key == key, t.job_metadata.c.value == value
                    )
                )
            )
        with self.read() as conn:
            rows = conn.execute(
                sa.select(t.jobs)
                .where(*where)
                .order_by(t.jobs.c.status.in_(in_progress).desc(), t.jobs.c.start_time.desc())
                .limit(limit)
            ).all()
        return [Job.from_row(row) for row in rows]

    def in_progress_jobs(self) -> list[Job]:
        in_progress = [s.value for s in JobStatus if s.in_progress]
        with self.read() as conn:
            rows = conn.execute(sa.select(t.jobs).where(t.jobs.c.status.in_(in_progress))).all()
        return [Job.from_row(row) for row in rows]

    def job_progress(self, job_id: str) -> JobProgress | None:
        """A job with its batch counts and, while it runs, its worker counts: what a status
        request shows, read on one connection (None if there is no such job)."""
        with self.read() as conn:
            row = conn.execute(sa.select(t.jobs).where(t.jobs.c.job_id == job_id)).first()
            if row is None:
                return None
            job = Job.from_row(row)
            batches = batch_counts(conn, job)
            # Workers run while a file dataset is still enqueuing, so they count then too.
            workers = None
            if job.status in (JobStatus.ENQUEUING, JobStatus.RUNNING):
                workers = state_counts(conn, t.workers, [s.value for s in WorkerState], job_id)
        return job, batches, workers

    def worker_counts(self, job_id: str) -> dict[str, int]:
        return self._state_counts(t.workers, [s.value for s in WorkerState], job_id)

    def batch_counts(self, job_id: str) -> dict[str, int]:
        with self.read() as conn:
            return batch_state_counts(conn, job_id)

    def _state_counts(self, table: sa.Table, states: list[str], job_id: str) -> dict[str, int]:
        with self.read() as conn:
            return state_counts(conn, table, states, job_id)

    def set_status(
        self,
        job_id: str,
        new: JobStatus,
        *,
        error_kind: str | None = None,
        error_message: str | None = None,
        error_traceback: str | None = None,
    ) -> bool:
        """Move a job to `new` if the state machine allows it; False if it does not (for
        example the job already ended: the first terminal status wins)."""
        with self.write() as conn:
            return transition(conn, job_id, new, error_kind, error_message, error_traceback)

    def set_has_hook(self, job_id: str, has_hook: bool) -> None:
        with self.write() as conn:
            conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id, t.jobs.c.has_hook.is_(None))
                .values(has_hook=has_hook)
            )

    def count_restart(self, job_id: str, limit: int) -> bool:
        """Take one worker restart from the job's budget; False when it is spent."""
        with self.write() as conn:
            updated = conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id, t.jobs.c.worker_restarts < limit)
                .values(worker_restarts=t.jobs.c.worker_restarts + 1)
            )
            return updated.rowcount == 1


# -- helpers that run inside a caller's transaction ---------------------------------------------


# Every worker request reads its job (or locks it): built once.
_GET = sa.select(t.jobs).where(t.jobs.c.job_id == sa.bindparam("j"))
_LOCK = _GET.with_for_update()
_KEY_SHARE = _GET.with_for_update(read=True, key_share=True)
_WORKER_JOB = sa.select(t.jobs.c.job_id, t.jobs.c.api_name, t.jobs.c.worker_token).where(
    t.jobs.c.job_id == sa.bindparam("j")
)


def get(conn: Connection, job_id: str) -> Job:
    row = conn.execute(_GET, {"j": job_id}).first()
    if row is None:
        raise errors.JobMissing(job_id)
    return Job.from_row(row)


@overload
def lock(conn: Connection, job_id: str, *, key_share: bool = ...) -> Job: ...
@overload
def lock(
    conn: Connection, job_id: str, *, key_share: bool = ..., missing_ok: Literal[True]
) -> Job | None: ...
def lock(
    conn: Connection, job_id: str, *, key_share: bool = False, missing_ok: bool = False
) -> Job | None:
    """Read a job under its row lock: `FOR UPDATE`, or `FOR KEY SHARE` for a bare lease.

    FOR KEY SHARE conflicts with FOR UPDATE only: bare leases do not wait for each other nor
    for counter updates, while a status change waits for them (and they for it). SQLite
    ignores both; its writers are serial.
    """
    row = conn.execute(_KEY_SHARE if key_share else _LOCK, {"j": job_id}).first()
    if row is None:
        if missing_ok:
            return None
        raise errors.JobMissing(job_id)
    return Job.from_row(row)


def transition(
    conn: Connection,
    job_id: str,
    new: JobStatus,
    error_kind: str | None = None,
    error_message: str | None = None,
    error_traceback: str | None = None,
) -> bool:
    """`Store.set_status` inside the caller's transaction."""
    job = lock(conn, job_id)
    if not can_transition(job.status, new):
        return False
    values: dict[str, Any] = {"status": new.value}
    if new.terminal:
        values["end_time"] = time.time()
    if error_kind is not None:
        values.update(
            error_kind=error_kind, error_message=error_message, error_traceback=error_traceback
        )
    # Compare-and-set on the status we read, so two writers cannot both win.
    updated = conn.execute(
        t.jobs.update()
        .where(t.jobs.c.job_id == job_id, t.jobs.c.status == job.status.value)
        .values(**values)
    )
    if updated.rowcount != 1:
        return False
    outbox.record_event(conn, job, new)
    if new.terminal:
        # No batch stays leased once a job has ended; results that arrive later are ignored.
        conn.execute(
            t.batches.update()
            .where(t.batches.c.job_id == job_id, t.batches.c.state == BatchState.LEASED.value)
            .values(state=BatchState.QUEUED.value, lease_owner=None, lease_expires_at=None)
        )
    return True


def finalize(conn: Connection, job: Job) -> JobStatus:
    """Give a job whose batches have all ended its final status from its counters."""
    current = get(conn, job.job_id)
    status = JobStatus.SUCCEEDED if current.failed == 0 else JobStatus.COMPLETED_WITH_FAILURES
    transition(conn, job.job_id, status)
    return status


def batch_counts(conn: Connection, job: Job) -> dict[str, int]:
    """A job's batches by state, from its counters (kept in the same transactions as the
    batch rows) and a count of its leased batches alone (at most its workers' prefetch, on the
    (job_id, state, seq) index): a status request does not walk a million-batch job's rows.
    A job whose failure budget was spent is counted row by row, with its `not_run` batches."""
    if budget.spent(job):
        return batch_state_counts(conn, job.job_id)
    leased = conn.execute(
        sa.select(sa.func.count())
        .select_from(t.batches)
        .where(t.batches.c.job_id == job.job_id, t.batches.c.state == BatchState.LEASED.value)
    ).scalar_one()
    return {
        BatchState.QUEUED.value: job.total_batch_count - job.succeeded - job.failed - leased,
        BatchState.LEASED.value: leased,
        BatchState.SUCCEEDED.value: job.succeeded,
        BatchState.FAILED.value: job.failed,
    }


def batch_state_counts(conn: Connection, job_id: str) -> dict[str, int]:
    """A job's batches by state: queued, leased, succeeded, failed, and `not_run` only for a
    job whose failure budget left some unrun."""
    counts = state_counts(conn, t.batches, [s.value for s in BatchState], job_id)
    if not counts[BatchState.NOT_RUN.value]:
        del counts[BatchState.NOT_RUN.value]
    return counts


def state_counts(
    conn: Connection, table: sa.Table, states: list[str], job_id: str
) -> dict[str, int]:
    """How many of a job's rows are in each state (every state present, 0 if none)."""
    counts = dict.fromkeys(states, 0)
    for state, n in conn.execute(
        sa.select(table.c.state, sa.func.count())
        .where(table.c.job_id == job_id)
        .group_by(table.c.state)
    ):
        counts[state] = n
    return counts
