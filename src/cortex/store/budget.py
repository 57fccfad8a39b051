"""A job's failure budget (`max_failed_batches`), in the caller's transaction: once more
batches have failed than it allows, the job stops leasing, its other batches are marked
`not_run`, and the reason is on the job; its completion (`results.maybe_complete`) then ends
it `status_completed_with_failures` without running `on_job_complete`."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.jobs import BatchState
from cortex.store import tables as t
from cortex.store.records import Job

KIND = "batchapi.max_failed_batches_exceeded"
NOT_RUN_MESSAGE = "not run: the job's failure budget (max_failed_batches) was spent first"


def spent(job: Job) -> bool:
    """Whether the job's failure budget is spent (it leases nothing more)."""
    return job.error_kind == KIND


def check(conn: Connection, job_id: str, max_failed: int) -> bool:
    """After a batch failed for good: spend the budget if the failures are now over it.
    Returns True if this call spent it."""
    failed, kind = conn.execute(
        sa.select(t.jobs.c.failed, t.jobs.c.error_kind).where(t.jobs.c.job_id == job_id)
    ).one()
    if failed <= max_failed or kind is not None:
        return False
    conn.execute(
        t.jobs.update()
        .where(t.jobs.c.job_id == job_id, t.jobs.c.error_kind.is_(None))
        .values(
            error_kind=KIND,
            error_message=(
                f"{failed} batches failed, more than max_failed_batches ({max_failed}): the "
                "job stopped early; the batches it did not run are listed as not run"
            ),
        )
    )
    mark_not_run(conn, job_id, leased_too=True)
    return True


def mark_not_run(conn: Connection, job_id: str, leased_too: bool = False) -> int:
    """Batches still to do become `not_run`: queued ones, and with `leased_too` those a
    worker runs now (its report of them is then dropped, as for a batch no longer its)."""
    states = [BatchState.QUEUED.value]
    if leased_too:
        states.append(BatchState.LEASED.value)
    updated = conn.execute(
        t.batches.update()
        .where(t.batches.c.job_id == job_id, t.batches.c.state.in_(states))
        .values(
            state=BatchState.NOT_RUN.value,
            lease_owner=None,
            lease_expires_at=None,
            deadline_at=None,
            error_kind="not_run",
            error_message=NOT_RUN_MESSAGE,
        )
    )
    return int(updated.rowcount)
