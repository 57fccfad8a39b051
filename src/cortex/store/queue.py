"""The batch queue: leasing batches to workers, their results, heartbeats, lease expiry, and
deciding when a job is complete (and which worker runs its `on_job_complete`)."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.jobs import BatchState, JobStatus, WorkerState
from cortex.store import budget, engine, jobrows, leasing, pool, protocol
from cortex.store import results as outcomes
from cortex.store import tables as t
from cortex.store.records import BatchResult, HookResult, Job, LeasedBatch, LeaseResult


class QueueStore(engine.BaseStore):
    """`Store`'s side of the worker queue: lease, heartbeat, hook, expiry."""

    def lease(
        self,
        job_id: str,
        worker_id: str,
        results: list[BatchResult],
        max_batches: int,
        lease_s: float,
        seq: int | None = None,
        hold: bool = False,
        leaving: bool = False,
    ) -> LeaseResult:
        """Record a worker's results and lease it up to `max_batches` more, in one transaction.

        When the results end the job's last batch, the completion is decided here too: a job
        whose predictor has `on_job_complete` is claimed by this worker (it alone gets
        `run_hook`); any other job gets its final status in this same transaction.

        With `seq` (the worker's request number, see `protocol`), the answer is kept in that
        same transaction, and the same request sent again gets it back: its results are not
        counted again, the batches it leased come back to it (those it still holds), and a
        hook claim is told again rather than lost.

        With `hold` (and `max_batches` 0), the request only reports: the worker still runs the
        other batches it holds, so they are not given back (a worker sends its results early
        when they are big, rather than one huge report). With `leaving`, the worker reports
        before it exits (a batch ran past its batch_timeout): the batches it did not start go
        back, and it is given nothing, not even the hook's claim.
        """
        now = time.time()
        with self.write() as conn:
            # Results may end the job's last batch, so a report takes the job row exclusively;
            # a bare lease only needs the status to hold still (see `sql`'s docstring).
            job = jobrows.lock(conn, job_id, key_share=not results)
            if seq is not None:
                kept = protocol.claim(conn, job_id, worker_id, protocol.LOOP, seq, "lease")
                if kept is not None:
                    return _replay(conn, job, worker_id, kept)
            if job.status.terminal:
                return _answer(conn, worker_id, seq, LeaseResult(batches=[], done=True))
            if results:
                outcomes.record_results(conn, job, worker_id, results)
            if not hold:
                leasing.release_lost(conn, job_id, worker_id)
            # Workers lease while a file dataset is still being enqueued: they start on the
            # first durable batches. Completion waits for `enqueue_done` (outcomes.maybe_complete).
            if (
                max_batches > 0
                and not leaving
                and job.status.in_progress
                and not budget.spent(job)
                and not _draining(conn, worker_id)
            ):
                left = job.total_batch_count - job.succeeded - job.failed - len(results)
                if left < max_batches * job.workers:
                    # Near the end, a fair share of what is left: one worker's prefetch must
                    # not hold the last batches while the others stand idle.
                    max_batches = min(max_batches, -(-left // _leasing_workers(conn, job_id)))
                leased = leasing.take(conn, job, worker_id, max(1, max_batches), now, now + lease_s)
                if leased:
                    return _answer(conn, worker_id, seq, LeaseResult(batches=leased))
            if hold or leaving:
                return _answer(conn, worker_id, seq, LeaseResult(batches=[]))
            if results:
                return _answer(conn, worker_id, seq, _nothing_leased(conn, job_id, worker_id))
        # Nothing to lease: whether the job is complete is decided under the exclusive lock,
        # so two workers ending the last two batches at once cannot both miss it. The first
        # transaction kept no answer, so `seq` is still this request's to answer (unless a copy
        # of it answered meanwhile: then that answer is this one's too).
        with self.write() as conn:
            job = jobrows.lock(conn, job_id)
            if seq is not None:
                kept = protocol.claim(conn, job_id, worker_id, protocol.LOOP, seq, "lease")
                if kept is not None:
                    return _replay(conn, job, worker_id, kept)
            return _answer(conn, worker_id, seq, _nothing_leased(conn, job_id, worker_id))

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend every lease the worker holds and note that it was seen; False if the job
        has ended."""
        now = time.time()
        with self.write() as conn:
            job = jobrows.get(conn, job_id)
            if job.status.terminal:
                return False
            # Only the lease expiry changes (never a batch's state), so no job lock is needed:
            # an expiry or a stop that runs at the same time re-checks its WHERE after this.
            conn.execute(
                t.workers.update()
                .where(t.workers.c.worker_id == worker_id, t.workers.c.job_id == job_id)
                .values(seen_at=now)
            )
            # A lease with a deadline (a batch_timeout) is never renewed past it.
            deadline = t.batches.c.deadline_at
            conn.execute(
                t.batches.update()
                .where(
                    t.batches.c.job_id == job_id,
                    t.batches.c.state == BatchState.LEASED.value,
                    t.batches.c.lease_owner == worker_id,
                )
                .values(
                    lease_expires_at=sa.case(
                        (deadline.is_not(None) & (deadline < now + lease_s), deadline),
                        else_=now + lease_s,
                    )
                )
            )
            return True

    def finish_hook(
        self,
        job_id: str,
        worker_id: str,
        error: str | None,
        traceback: str | None,
        seq: int | None = None,
    ) -> HookResult:
        """The claimed worker ran on_job_complete; write the final status now. A report sent
        again (same `seq`) gets the status the first one got, and ends nothing."""
        with self.write() as conn:
            job = jobrows.lock(conn, job_id)
            if seq is not None:
                kept = protocol.claim(conn, job_id, worker_id, protocol.LOOP, seq, "hook")
                if kept is not None:
                    return HookResult(JobStatus(kept["status"]))
            result = _finish_hook(conn, job, worker_id, error, traceback)
            if seq is not None:
                reply = {"op": "hook", "status": result.status.value}
                protocol.record(conn, worker_id, protocol.LOOP, seq, reply, final=True)
            return result

    def expire_leases(self) -> int:
        """End the attempt of every batch whose lease ran out: it is queued again, or failed if
        it has used all its attempts (a batch that keeps killing its worker must not loop)."""
        now = time.time()
        expired = (outcomes.IS_LEASED, t.batches.c.lease_expires_at < now)
        with self.read() as conn:
            # (Not DISTINCT: SQLite would rather walk all of the job index in job order than
            # the leased batches in the lease index. They are few; their jobs are fewer.)
            found = conn.execute(sa.select(t.batches.c.job_id).where(*expired)).scalars()
            job_ids = list(dict.fromkeys(found))
        ended = 0
        for job_id in job_ids:  # one transaction per job: its row first, then its batches
            with self.write() as conn:
                if jobrows.lock(conn, job_id, missing_ok=True) is None:
                    continue
                rows = conn.execute(
                    outcomes.leased_rows().where(t.batches.c.job_id == job_id, *expired)
                ).all()
                for row in rows:
                    ended += outcomes.end_attempt(
                        conn,
                        row,
                        "lease_expired",
                        "the lease expired: the worker stopped heartbeating (it hung, crashed "
                        "or lost the server)",
                    )
        return ended

    def release_worker_leases(
        self, job_id: str, worker_id: str, kind: str = "worker_died", reason: str = ""
    ) -> int:
        """A worker is known dead: end the attempts it held now rather than at lease expiry."""
        with self.write() as conn:
            if jobrows.lock(conn, job_id, missing_ok=True) is None:
                return 0
            rows = conn.execute(
                outcomes.leased_rows().where(
                    t.batches.c.job_id == job_id,
                    t.batches.c.state == BatchState.LEASED.value,
                    t.batches.c.lease_owner == worker_id,
                )
            ).all()
            ended = 0
            for row in rows:
                ended += outcomes.end_attempt(conn, row, kind, reason or f"worker {worker_id} died")
            return ended

    def extend_worker_leases(self, job_id: str, worker_id: str, lease_s: float) -> None:
        """Renew a worker's leases without checking the job (used when adopting workers)."""
        with self.write() as conn:
            conn.execute(
                t.batches.update()
                .where(
                    t.batches.c.job_id == job_id,
                    t.batches.c.state == BatchState.LEASED.value,
                    t.batches.c.lease_owner == worker_id,
                )
                .values(lease_expires_at=time.time() + lease_s)
            )


# -- helpers that run inside a caller's transaction ---------------------------------------------


def _draining(conn: Connection, worker_id: str) -> bool:
    """Whether the worker must not take more batches: asked to drain, or its row has ended
    (`pool.surplus`)."""
    row = conn.execute(_DRAINING, {"w": worker_id}).first()
    return row is not None and (bool(row.draining) or WorkerState(row.state).ended)


def _nothing_leased(conn: Connection, job_id: str, worker_id: str) -> LeaseResult:
    """Nothing was leased (under the job's exclusive lock): whether the job is complete and
    who runs its hook; otherwise whether this worker should leave (asked to drain, or more
    workers than batches left: `pool.surplus`), which ends its work like a done job does."""
    result = outcomes.maybe_complete(conn, job_id, worker_id)
    if result.done or result.run_hook or result.batches:
        return result
    if pool.surplus(conn, jobrows.get(conn, job_id), worker_id):
        return LeaseResult(batches=[], done=True)
    return result


def _finish_hook(
    conn: Connection, job: Job, worker_id: str, error: str | None, traceback: str | None
) -> HookResult:
    if job.completion_state != "claimed" or job.completion_worker != worker_id:
        return HookResult(job.status)
    conn.execute(
        t.jobs.update().where(t.jobs.c.job_id == job.job_id).values(completion_state="done")
    )
    if error is None:
        jobrows.finalize(conn, job)
    else:
        jobrows.transition(
            conn,
            job.job_id,
            JobStatus.WORKER_ERROR,
            "batchapi.on_job_complete_failed",
            f"on_job_complete raised on worker {worker_id}: {error}",
            traceback,
        )
    status = jobrows.get(conn, job.job_id).status
    # Read under the job's lock: a stop that came first already said the job ended.
    return HookResult(status, taken=True, ended=status.terminal and not job.status.terminal)


def _answer(conn: Connection, worker_id: str, seq: int | None, result: LeaseResult) -> LeaseResult:
    """Keep a lease's answer for a copy of its request: the batches by their place in the job
    (their payloads are read again from `batch_payloads`), and whether the worker is done,
    which makes its exit a clean one whatever its code (`ProtocolStore.worker_finished`)."""
    if seq is not None:
        reply = {
            "op": "lease",
            "seqs": [batch.seq for batch in result.batches],
            "run_hook": result.run_hook,
            "done": result.done,
        }
        protocol.record(conn, worker_id, protocol.LOOP, seq, reply, final=result.done)
    return result


def _replay(conn: Connection, job: Job, worker_id: str, kept: protocol.Reply) -> LeaseResult:
    """The kept answer of a lease sent again, as it stands now: the batches it leased that are
    still leased to this worker (one whose lease expired meanwhile may be someone else's), and
    done if the job has ended since (a stop released them all)."""
    if job.status.terminal:
        return LeaseResult(batches=[], done=True)
    seqs: list[int] = kept["seqs"]
    held = []
    if seqs:
        rows = conn.execute(
            sa.select(t.batches.c.seq, t.batches.c.batch_id, t.batches.c.attempts)
            .where(
                t.batches.c.job_id == job.job_id,
                t.batches.c.seq.in_(seqs),
                t.batches.c.state == BatchState.LEASED.value,
                t.batches.c.lease_owner == worker_id,
            )
            .order_by(t.batches.c.seq)
        ).all()
        payloads = leasing.payloads(conn, job.job_id, [row.seq for row in rows])
        held = [LeasedBatch(r.batch_id, payloads[r.seq], r.attempts, r.seq) for r in rows]
    return LeaseResult(batches=held, run_hook=bool(kept["run_hook"]), done=bool(kept["done"]))


def _leasing_workers(conn: Connection, job_id: str) -> int:
    """How many of the job's workers lease batches now or are about to (at least 1)."""
    count = conn.execute(_LEASING, {"j": job_id}).scalar_one()
    return max(1, int(count))


# -- statements built once --------------------------------------------------------------------

_DRAINING = sa.select(t.workers.c.draining, t.workers.c.state).where(
    t.workers.c.worker_id == sa.bindparam("w")
)
_LEASING = (
    sa.select(sa.func.count())
    .select_from(t.workers)
    .where(
        t.workers.c.job_id == sa.bindparam("j"),
        t.workers.c.state.in_([WorkerState.INITIALIZING.value, WorkerState.RUNNING.value]),
    )
)
