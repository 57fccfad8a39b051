"""What a worker's results change, in the caller's transaction: each batch's state and the
job's counters, an attempt ended (retried or failed for good), and, once nothing is left to
lease, whether the job is complete and which worker runs its `on_job_complete`. Leasing is
`cortex.store.queue`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.jobs import BatchState
from cortex.store import budget, jobrows
from cortex.store import tables as t
from cortex.store.prepared import Prepared
from cortex.store.records import BatchResult, Job, LeaseResult

# A batch still to be done: queued, or leased to a worker.
ACTIVE = (BatchState.QUEUED.value, BatchState.LEASED.value)
# A leased batch, `'leased'` written into the SQL rather than bound: the sweeps over leases
# of all jobs then go through the partial index `ix_batches_lease` (`state = 'leased'`) on
# both engines, whose planners cannot match a bound value to it (PostgreSQL's generic plans).
IS_LEASED = t.batches.c.state == sa.literal(BatchState.LEASED.value, literal_execute=True)


def record_results(conn: Connection, job: Job, worker_id: str, results: list[BatchResult]) -> None:
    """Apply a worker's results for the batches it still holds, in a few statements.

    A result for a batch that is no longer leased to this worker (its lease expired and the
    batch went to someone else, or the report is a retry of one already applied) is dropped,
    so every batch is counted once. Successes are one executemany and one counter update;
    failures (rare) go one by one through `end_attempt`.
    """
    latest = {result.batch_id: result for result in results}  # a batch reported twice: once
    rows = _HELD.run(conn, job.job_id, worker_id, list(latest)).all()
    held = {row.batch_id: row for row in rows}
    succeeded = [(r, held[r.batch_id]) for r in latest.values() if r.ok and r.batch_id in held]
    kept = [(job.job_id, row.seq, r.lines, len(r.lines)) for r, row in succeeded if r.lines]
    if kept:  # with the success itself: a report applied once writes its results once
        _INSERT_RESULTS.run_many(conn, kept)
    if succeeded:
        _SUCCEED.run_many(conn, [(r.duration_s, job.job_id, row.seq) for r, row in succeeded])
        seconds = sum(r.duration_s for r, _ in succeeded)
        conn.execute(_COUNT, {"n": len(succeeded), "t": seconds, "j": job.job_id})
    for result in latest.values():
        if not result.ok and result.batch_id in held:
            end_attempt(
                conn,
                held[result.batch_id],
                result.error_kind,
                result.error,
                result.traceback,
                result.duration_s,
            )


def leased_rows() -> sa.Select[Any]:
    """Batch rows with what `end_attempt` needs to know."""
    return sa.select(
        t.batches.c.job_id,
        t.batches.c.seq,
        t.batches.c.attempts,
        t.jobs.c.max_attempts,
        t.jobs.c.max_failed_batches,
    ).join(t.jobs, t.jobs.c.job_id == t.batches.c.job_id)


# A report's statements, over a few hundred batches each (see `prepared`): its batches still
# leased to the worker, their results, and their success.
_HELD = Prepared(
    leased_rows()
    .add_columns(t.batches.c.batch_id)
    .where(
        t.batches.c.job_id == sa.bindparam("j"),
        t.batches.c.state == BatchState.LEASED.value,
        t.batches.c.lease_owner == sa.bindparam("w"),
        t.batches.c.batch_id.in_(sa.bindparam("ids", expanding=True)),
    ),
    "j",
    "w",
    "ids",
)
_INSERT_RESULTS = Prepared(
    t.batch_results.insert().values(
        job_id=sa.bindparam("j"),
        seq=sa.bindparam("s"),
        lines=sa.bindparam("l"),
        size=sa.bindparam("n"),
    ),
    "j",
    "s",
    "l",
    "n",
)
# The rows were just read under the job's lock, still leased to the reporting worker.
_SUCCEED = Prepared(
    t.batches.update()
    .where(
        t.batches.c.job_id == sa.bindparam("j"),
        t.batches.c.seq == sa.bindparam("s"),
        t.batches.c.state == BatchState.LEASED.value,
    )
    .values(
        state=BatchState.SUCCEEDED.value,
        lease_owner=None,
        lease_expires_at=None,
        duration_s=sa.bindparam("d"),
    ),
    "d",
    "j",
    "s",
)
_COUNT = (
    t.jobs.update()
    .where(t.jobs.c.job_id == sa.bindparam("j"))
    .values(
        succeeded=t.jobs.c.succeeded + sa.bindparam("n", type_=sa.Integer),
        succeeded_time_s=t.jobs.c.succeeded_time_s + sa.bindparam("t", type_=sa.Float),
    )
)


def end_attempt(
    conn: Connection,
    row: Any,
    kind: str,
    message: str | None,
    traceback: str | None = None,
    duration_s: float | None = None,
) -> int:
    """A leased batch's attempt failed: queue it again, or fail it on its last attempt.
    Returns 1 if it was still leased (and so was ended here), else 0.

    Attempts are counted when a batch is leased, so a batch that kills its worker uses them up
    like one that raises, and ends `failed` with the reason instead of looping forever.
    """
    final = row.attempts >= row.max_attempts
    updated = conn.execute(
        t.batches.update()
        .where(
            t.batches.c.job_id == row.job_id,
            t.batches.c.seq == row.seq,
            t.batches.c.state == BatchState.LEASED.value,
        )
        .values(
            state=(BatchState.FAILED if final else BatchState.QUEUED).value,
            lease_owner=None,
            lease_expires_at=None,
            duration_s=duration_s,
            error_kind=kind,
            error_message=message,
            error_traceback=traceback,
        )
    )
    if final and updated.rowcount == 1:
        conn.execute(
            t.jobs.update().where(t.jobs.c.job_id == row.job_id).values(failed=t.jobs.c.failed + 1)
        )
        if row.max_failed_batches is not None:
            budget.check(conn, row.job_id, row.max_failed_batches)
    return int(updated.rowcount)


def maybe_complete(conn: Connection, job_id: str, worker_id: str) -> LeaseResult:
    """Nothing to lease: decide whether the job is complete, and who runs the hook.

    A job that is complete goes on in steps, each a compare-and-set on `completion_state`:
    with an output location, "writing" (the server writes the results there, then
    `finish_output` moves on to "written"); then the hook's claim ("claimed", one worker runs
    `on_job_complete`) or, without a hook, the final status ("done"). A job whose failure
    budget is spent runs no hook."""
    job = jobrows.get(conn, job_id)
    if job.status.terminal:
        return LeaseResult(batches=[], done=True)
    if not job.enqueue_done:
        return LeaseResult(batches=[])
    spent = budget.spent(job)
    if spent:
        budget.mark_not_run(conn, job_id)  # batches enqueued after the budget was spent
    active = conn.execute(
        sa.select(t.batches.c.seq)
        .where(t.batches.c.job_id == job_id, t.batches.c.state.in_(ACTIVE))
        .limit(1)
    ).first()
    if active is not None:
        # Other workers still hold batches; one may fail and come back, so stay.
        return LeaseResult(batches=[])
    state = job.completion_state
    if state == "writing":
        return LeaseResult(batches=[])  # the server is writing the results out
    if state in ("claimed", "done"):
        return LeaseResult(batches=[], done=job.completion_worker != worker_id)
    if job.output is not None and state is None:
        began = conn.execute(
            t.jobs.update()
            .where(t.jobs.c.job_id == job_id, t.jobs.c.completion_state.is_(None))
            .values(completion_state="writing")
        )
        return LeaseResult(batches=[], write_output=began.rowcount == 1)
    if spent or job.has_hook is False:
        conn.execute(
            t.jobs.update()
            .where(t.jobs.c.job_id == job_id)
            .values(completion_state="done", completion_worker=worker_id)
        )
        return LeaseResult(batches=[], done=True, final_status=jobrows.finalize(conn, job))
    if job.has_hook is None:
        return LeaseResult(batches=[])  # no worker has loaded the predictor yet
    # The compare-and-set on completion_state makes this worker the only one to run it.
    claimed = conn.execute(
        t.jobs.update()
        .where(t.jobs.c.job_id == job_id, t.jobs.c.completion_state == state)
        .values(completion_state="claimed", completion_worker=worker_id)
    )
    if claimed.rowcount == 1:
        return LeaseResult(batches=[], run_hook=True)
    return LeaseResult(batches=[], done=True)
