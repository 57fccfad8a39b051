"""Worker rows: the workers of a job, their numbering, and the states their launchers report.
Which replica watches them and which are lost is `cluster`'s."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.jobs import WorkerState, can_move, moves_to, new_worker_id
from cortex.store import engine, jobrows
from cortex.store import tables as t
from cortex.store.records import WorkerRecord


class WorkerStore(engine.BaseStore):
    """`Store`'s worker rows: adding them, their states, reading them."""

    def add_workers(self, job_id: str, count: int, replica_id: str) -> list[str]:
        """Rows for `count` more workers of a job, owned by `replica_id`; returns their ids.

        The job row is locked while the next numbers are taken, so two replicas adding
        workers to one job at once get distinct ids.
        """
        with self.write() as conn:
            jobrows.lock(conn, job_id)
            existing = conn.execute(
                sa.select(sa.func.count())
                .select_from(t.workers)
                .where(t.workers.c.job_id == job_id)
            ).scalar_one()
            return insert(conn, job_id, range(existing, existing + count), replica_id, time.time())

    def update_worker(
        self,
        worker_id: str,
        state: WorkerState,
        *,
        pid: int | None = None,
        exit_code: int | None = None,
        error_message: str | None = None,
    ) -> bool:
        """Record a worker's new state if the state table allows the move (see
        `jobs.can_move`: an ended worker stays ended); whether it did."""
        with self.write() as conn:
            return move(
                conn, worker_id, state, pid=pid, exit_code=exit_code, error_message=error_message
            )

    def end_worker(
        self,
        worker_id: str,
        state: WorkerState,
        *,
        exit_code: int | None = None,
        error_message: str | None = None,
    ) -> WorkerRecord | None:
        """End a worker (`succeeded`, `failed` or `unknown`); returns its row as it was before
        if this call ended it, None if it had ended already (or has no row).

        A compare-and-set: of two that end one worker (an exit seen again after a store error,
        the leader marking it lost while its replica saw it exit), one gets the row, so its
        death is handled once.
        """
        assert state.ended
        with self.write() as conn:
            row = conn.execute(
                sa.select(t.workers).where(t.workers.c.worker_id == worker_id).with_for_update()
            ).first()
            if row is None or not can_move(WorkerState(row.state), state):
                return None
            move(conn, worker_id, state, exit_code=exit_code, error_message=error_message)
            return worker_record(row)

    def get_worker(self, worker_id: str) -> WorkerRecord | None:
        with self.read() as conn:
            row = conn.execute(
                sa.select(t.workers).where(t.workers.c.worker_id == worker_id)
            ).first()
        return None if row is None else worker_record(row)

    def list_workers(self, job_id: str) -> list[WorkerRecord]:
        with self.read() as conn:
            rows = conn.execute(
                sa.select(t.workers)
                .where(t.workers.c.job_id == job_id)
                .order_by(t.workers.c.started_at)
            ).all()
        return [worker_record(r) for r in rows]


# -- helpers that run inside a caller's transaction ---------------------------------------------


def worker_record(r: Any) -> WorkerRecord:
    return WorkerRecord(
        worker_id=r.worker_id,
        job_id=r.job_id,
        state=WorkerState(r.state),
        pid=r.pid,
        exit_code=r.exit_code,
        error_message=r.error_message,
        started_at=r.started_at,
        updated_at=r.updated_at,
        replica_id=r.replica_id,
        seen_at=r.seen_at,
        draining=bool(r.draining),
    )


def move(
    conn: Connection,
    worker_id: str,
    state: WorkerState,
    *,
    pid: int | None = None,
    exit_code: int | None = None,
    error_message: str | None = None,
) -> bool:
    """`update_worker` inside the caller's transaction: a compare-and-set on the states the
    table lets move to `state`, so a late report cannot undo a later one."""
    now = time.time()
    values: dict[str, Any] = {"state": state.value, "updated_at": now, "seen_at": now}
    if pid is not None:
        values["pid"] = pid
    if exit_code is not None:
        values["exit_code"] = exit_code
    if error_message is not None:
        values["error_message"] = error_message
    moved = conn.execute(
        t.workers.update()
        .where(
            t.workers.c.worker_id == worker_id,
            t.workers.c.state.in_([s.value for s in moves_to(state)]),
        )
        .values(**values)
    )
    return bool(moved.rowcount == 1)


def insert(conn: Connection, job_id: str, indexes: range, replica_id: str, now: float) -> list[str]:
    """Pending rows, owned by `replica_id`, for the job's workers numbered `indexes`."""
    ids = [new_worker_id(job_id, index) for index in indexes]
    if ids:
        conn.execute(
            t.workers.insert(),
            [
                {
                    "worker_id": wid,
                    "job_id": job_id,
                    "state": WorkerState.PENDING.value,
                    "replica_id": replica_id,
                    "started_at": now,
                    "updated_at": now,
                    "seen_at": now,
                }
                for wid in ids
            ],
        )
    return ids
