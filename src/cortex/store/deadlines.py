"""Batch deadlines (a job's `batch_timeout`): the server's backstop for a worker too wedged
to time out its own `predict` (in C code that holds the interpreter's lock, its watchdog and
heartbeat threads cannot run). A batch's deadline is set when it is leased
(`leasing.take`); a batch still leased past it ends its attempt as `batch_timeout`,
and its worker is killed by the reconciler."""

from __future__ import annotations

import time

import sqlalchemy as sa

from cortex.store import engine, jobrows
from cortex.store import results as outcomes
from cortex.store import tables as t


class DeadlineStore(engine.BaseStore):
    """`Store`'s side of batch deadlines."""

    def expire_deadlines(self) -> list[tuple[str, str]]:
        """End the attempt of every batch run past its deadline (its job's `batch_timeout`
        and a grace): its worker did not time its `predict` out itself, so it is wedged.
        Returns the (job, worker) pairs whose workers must be killed."""
        now = time.time()
        overdue = (outcomes.IS_LEASED, t.batches.c.deadline_at < now)
        with self.read() as conn:
            # Through the lease index (see `QueueStore.expire_leases`).
            found = conn.execute(sa.select(t.batches.c.job_id).where(*overdue)).scalars()
            job_ids = list(dict.fromkeys(found))
        wedged: list[tuple[str, str]] = []
        for job_id in job_ids:
            with self.write() as conn:
                job = jobrows.lock(conn, job_id, missing_ok=True)
                if job is None:
                    continue
                rows = conn.execute(
                    outcomes.leased_rows()
                    .add_columns(t.batches.c.lease_owner)
                    .where(t.batches.c.job_id == job_id, *overdue)
                ).all()
                for row in rows:
                    message = (
                        f"predict ran past the job's batch_timeout of {job.batch_timeout_s} s "
                        f"and worker {row.lease_owner} did not end it: the worker is killed"
                    )
                    if outcomes.end_attempt(conn, row, "batch_timeout", message):
                        wedged.append((job_id, row.lease_owner))
        return wedged
