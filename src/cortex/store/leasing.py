"""Taking queued batches for a lease, reading their payloads, and giving back what a worker
still holds; in the caller's transaction (`queue`'s `lease`). The statements are built once,
and those over many batches run on the driver (`prepared`)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.jobs import BatchState
from cortex.store import batchrows
from cortex.store import tables as t
from cortex.store.prepared import Prepared
from cortex.store.records import Job, LeasedBatch

_MAX_LEASE_BYTES = 4 << 20
# With a batch_timeout, how long past it the server waits for the worker's own report before
# it takes the worker for wedged (see `take`).
DEADLINE_GRACE_S = 5.0


def payloads(conn: Connection, job_id: str, seqs: list[int]) -> dict[int, bytes]:
    rows = _PAYLOADS[conn.dialect.name].run(conn, job_id, seqs)
    return {row.seq: row.payload for row in rows.all()}


def take(
    conn: Connection, job: Job, worker_id: str, max_batches: int, now: float, expires_at: float
) -> list[LeasedBatch]:
    """Lease up to `max_batches` queued batches, oldest first.

    SKIP LOCKED passes over rows another lease is taking right now, and PostgreSQL re-checks
    `state = queued` on a row that changed since the statement began, so two leases never
    take the same batch and neither waits for the other.

    With a `batch_timeout`, each batch gets a deadline: the worker runs them one after the
    other, each for at most the timeout, so the i-th (from 0) ends by (i + 1) timeouts from
    now, plus a grace for the worker's own report.
    """
    job_id = job.job_id
    candidates = _CANDIDATES.run(conn, job_id, max_batches).all()
    if not candidates:
        return []
    # A lease answer holds at most about `_MAX_LEASE_BYTES` of payloads (always one batch):
    # many small batches travel together, a few big ones do not make one huge response.
    kept, size = 0, 0
    for candidate in candidates:
        size += candidate.payload_size
        kept += 1
        if size >= _MAX_LEASE_BYTES:
            break
    candidates = candidates[:kept]
    seqs = [c.seq for c in candidates]
    if job.batch_timeout_s is None:
        _TAKE.run(conn, worker_id, expires_at, job_id, seqs)
    else:
        timeout = job.batch_timeout_s
        deadlines = [now + (i + 1) * timeout + DEADLINE_GRACE_S for i in range(len(seqs))]
        _TAKE_ONE.run_many(
            conn,
            [
                (worker_id, expires_at, deadline, job_id, seq)
                for deadline, seq in zip(deadlines, seqs, strict=True)
            ],
        )
    found = payloads(conn, job_id, seqs)
    return [LeasedBatch(c.batch_id, found[c.seq], c.attempts + 1, c.seq) for c in candidates]


def release_lost(conn: Connection, job_id: str, worker_id: str) -> None:
    """Give back what is still leased to a worker once its results are recorded.

    A worker reports every batch it held before it asks for more, so a batch still leased to
    it here was leased by a request whose answer never reached it: the server died before
    answering, or the request was sent again after a time-out. Its heartbeats would keep that
    lease alive for ever, and the job would never end. The batch never ran: it goes back to
    the queue without using an attempt.
    """
    conn.execute(_RELEASE_LOST, {"j": job_id, "w": worker_id})


_CANDIDATES = Prepared(
    sa.select(t.batches.c.seq, t.batches.c.batch_id, t.batches.c.attempts, t.batches.c.payload_size)
    .where(t.batches.c.job_id == sa.bindparam("j"), t.batches.c.state == BatchState.QUEUED.value)
    .order_by(t.batches.c.seq)
    .limit(sa.bindparam("n", type_=sa.Integer))
    .with_for_update(skip_locked=True),
    "j",
    "n",
)
_TAKEN = {
    "state": BatchState.LEASED.value,
    "lease_owner": sa.bindparam("w"),
    "lease_expires_at": sa.bindparam("e", type_=sa.Float),
    "attempts": t.batches.c.attempts + 1,
}
_QUEUED = (t.batches.c.job_id == sa.bindparam("j"), t.batches.c.state == BatchState.QUEUED.value)
_TAKE = Prepared(
    t.batches.update()
    .where(*_QUEUED, t.batches.c.seq.in_(sa.bindparam("s", expanding=True)))
    .values(**_TAKEN),
    "w",
    "e",
    "j",
    "s",
)
_TAKE_ONE = Prepared(
    t.batches.update()
    .where(*_QUEUED, t.batches.c.seq == sa.bindparam("s"))
    .values(**_TAKEN, deadline_at=sa.bindparam("deadline", type_=sa.Float)),
    "w",
    "e",
    "deadline",
    "j",
    "s",
)
_PAYLOADS = {
    dialect: Prepared(
        sa.select(t.batch_payloads.c.seq, payload).where(
            t.batch_payloads.c.job_id == sa.bindparam("j"),
            t.batch_payloads.c.seq.in_(sa.bindparam("s", expanding=True)),
        ),
        "j",
        "s",
    )
    for dialect, payload in batchrows.PAYLOAD_BYTES.items()
}
_RELEASE_LOST = (
    t.batches.update()
    .where(
        t.batches.c.job_id == sa.bindparam("j"),
        t.batches.c.state == BatchState.LEASED.value,
        t.batches.c.lease_owner == sa.bindparam("w"),
    )
    .values(
        state=BatchState.QUEUED.value,
        lease_owner=None,
        lease_expires_at=None,
        attempts=t.batches.c.attempts - 1,
    )
)
