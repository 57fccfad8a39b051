"""The worker pool in the store: what each live worker holds of the capacity, the scheduler's
pass (placing workers and asking others to drain, in one transaction under one lock), and a
worker's release of its place when its job no longer needs it.

A worker holds its API's compute from the moment its row is written (before its process is
started) until its row ends: its exit, crash, stop, timeout or loss all end the row, so they
all give the capacity back. Because the reservations are rows, a restarted server and every
replica see the same accounting; the pass takes a lock (PostgreSQL: an advisory transaction
lock; SQLite has one writer) so that two passes never place workers into the same room.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex import scheduling
from cortex.capacity import Resources
from cortex.jobs import JobStatus, WorkerState
from cortex.store import engine, workerrows
from cortex.store import tables as t
from cortex.store.records import Job

# Any number: the key of the advisory lock that serialises scheduling passes on PostgreSQL.
_PG_LOCK_KEY = 0x636F7274_706F6F6C & 0x7FFFFFFFFFFFFFFF
_ALIVE = [s.value for s in WorkerState if s.alive]
_IN_PROGRESS = [JobStatus.ENQUEUING.value, JobStatus.RUNNING.value]
# Workers that have loaded the predictor: a job past its slow start (`scheduling`).
_LOADED = [WorkerState.RUNNING.value, WorkerState.SUCCEEDED.value]

# What a job's workers take each, by the job's spec id.
PerWorker = Callable[[str], Resources]


class PoolStore(engine.BaseStore):
    """`Store`'s side of the worker pool."""

    def schedule(
        self,
        capacity: Resources,
        replica_id: str,
        per_worker: PerWorker,
        expected: dict[str, int] | None = None,
    ) -> tuple[scheduling.Plan, dict[str, list[str]]]:
        """One scheduling pass: decide (`scheduling.plan`) and write the decision. Returns
        the plan and the ids of the worker rows written for each job, owned by `replica_id`
        (which starts their processes), each holding its job's compute. `expected`: batches
        of jobs being enqueued that are known to come, counted in their backlog."""
        expected = expected or {}
        now = time.time()
        with self.write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
            jobs = {
                job.job_id: job
                for job in (
                    Job.from_row(row)
                    for row in conn.execute(
                        sa.select(t.jobs).where(t.jobs.c.status.in_(_IN_PROGRESS))
                    ).all()
                )
            }
            held = _held(conn)
            live: dict[str, int] = {}
            for worker in held:
                if not worker.draining:
                    live[worker.job_id] = live.get(worker.job_id, 0) + 1
            loaded = _loaded(conn, list(jobs))
            sizes = {job_id: per_worker(job.spec_id) for job_id, job in jobs.items()}
            demands = [
                scheduling.Demand(
                    job_id=job.job_id,
                    priority=job.priority,
                    start_time=job.start_time,
                    per_worker=sizes[job.job_id],
                    max_workers=job.workers,
                    min_workers=job.min_workers,
                    backlog=max(
                        job.total_batch_count - job.succeeded - job.failed,
                        expected.get(job.job_id, 0),
                    ),
                    enqueue_done=job.enqueue_done,
                    live=live.get(job.job_id, 0),
                    loaded=loaded.get(job.job_id, 0),
                )
                for job in jobs.values()
            ]
            plan = scheduling.plan(capacity, held, demands)
            # The lock order: job rows, then worker rows.
            for job in jobs.values():
                count, reason = plan.waiting.get(job.job_id, (0, None))
                if (count, reason) != (job.pending_workers, job.pending_reason):
                    conn.execute(
                        t.jobs.update()
                        .where(t.jobs.c.job_id == job.job_id)
                        .values(pending_workers=count, pending_reason=reason)
                    )
            placed = {
                job_id: _add(conn, job_id, count, sizes[job_id], replica_id, now)
                for job_id, count in plan.starts.items()
            }
            if plan.drain:
                conn.execute(
                    t.workers.update()
                    .where(t.workers.c.worker_id.in_(plan.drain))
                    .values(draining=True)
                )
        return plan, placed

    def pool_usage(self) -> list[scheduling.Held]:
        """Every live worker and what it holds."""
        with self.read() as conn:
            return _held(conn)

    def worker_draining(self, worker_id: str) -> bool:
        """Whether the worker was asked to finish its current batch and exit."""
        with self.read() as conn:
            draining = conn.execute(
                sa.select(t.workers.c.draining).where(t.workers.c.worker_id == worker_id)
            ).scalar()
        return bool(draining)


# -- helpers that run inside a caller's transaction ---------------------------------------------


def _held(conn: Connection) -> list[scheduling.Held]:
    w = t.workers.c
    rows = conn.execute(
        sa.select(w.worker_id, w.job_id, w.cpu, w.mem, w.gpu, w.draining, w.started_at).where(
            w.state.in_(_ALIVE)
        )
    ).all()
    return [
        scheduling.Held(
            r.worker_id, r.job_id, Resources(r.cpu, r.mem, r.gpu), bool(r.draining), r.started_at
        )
        for r in rows
    ]


def _loaded(conn: Connection, job_ids: list[str]) -> dict[str, int]:
    if not job_ids:
        return {}
    w = t.workers.c
    rows = conn.execute(
        sa.select(w.job_id, sa.func.count())
        .where(w.job_id.in_(job_ids), w.state.in_(_LOADED))
        .group_by(w.job_id)
    ).all()
    return {job_id: int(count) for job_id, count in rows}


def _add(
    conn: Connection, job_id: str, count: int, size: Resources, replica_id: str, now: float
) -> list[str]:
    """Rows for `count` more workers of a job, holding `size` each. Numbered after the job's
    existing rows: the pass's lock keeps two passes from taking the same numbers."""
    existing = conn.execute(
        sa.select(sa.func.count()).select_from(t.workers).where(t.workers.c.job_id == job_id)
    ).scalar_one()
    ids = workerrows.insert(conn, job_id, range(existing, existing + count), replica_id, now)
    conn.execute(
        t.workers.update()
        .where(t.workers.c.worker_id.in_(ids))
        .values(cpu=size.cpu, mem=size.mem, gpu=size.gpu)
    )
    return ids


def surplus(conn: Connection, job: Job, worker_id: str) -> bool:
    """Whether a worker that found nothing to lease should leave, and if so mark it draining
    (in the caller's transaction, under the job's lock): it was asked to drain; or its row has
    ended (it was taken for dead or lost, its batches given back and its capacity freed, yet it
    still runs: a server killed between starting it and recording its pid); or its job has all
    its batches written and more live workers than batches left (and than `min_workers`). The
    workers that stay are enough for what is left; should a batch come back (its worker died),
    the scheduler places a worker for it."""
    w = t.workers.c
    row = conn.execute(
        sa.select(w.draining, w.state).where(w.worker_id == worker_id, w.job_id == job.job_id)
    ).first()
    if row is None:
        return False
    if row.draining or WorkerState(row.state).ended:
        return True
    if not job.enqueue_done:
        return False
    backlog = job.total_batch_count - job.succeeded - job.failed
    if backlog == 0:
        return False  # completion is being decided: not this function's business
    others = conn.execute(
        sa.select(sa.func.count())
        .select_from(t.workers)
        .where(
            w.job_id == job.job_id,
            w.state.in_(_ALIVE),
            w.draining.is_(False),
        )
    ).scalar_one()
    if others <= max(backlog, job.min_workers):
        return False
    conn.execute(t.workers.update().where(w.worker_id == worker_id).values(draining=True))
    return True
