"""The worker protocol's memory: every worker request carries a sequence number, and the answer
to each worker's last request is kept, written in the transaction that acted on it.

A request sent again because its answer never arrived (a proxy closed the connection, the
server died after committing, the worker timed out while the server was still working) gets
the kept answer back and changes nothing more: no batch is leased twice, no result counted
twice, no hook claimed or finished twice, no log shipment stored twice.

A worker numbers its requests per channel, one request at a time in each: "loop" (the worker
loop: state reports, leases with their results, the hook's report) and "logs" (the log
shipper's thread). Heartbeats and reading the spec carry no number: renewing leases or reading
the spec again does no harm, and their answer must be the present one.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex import errors
from cortex.jobs import JobStatus, WorkerState
from cortex.store import engine, jobrows, logs, workerrows
from cortex.store import tables as t

LOOP = "loop"
LOGS = "logs"
Reply = dict[str, Any]


class ProtocolStore(engine.BaseStore):
    """`Store`'s side of the worker requests that are not about batches (`queue` has those):
    state reports, log shipments, and whether a worker was told its work was over."""

    def report_state(
        self,
        job_id: str,
        worker_id: str,
        state: WorkerState,
        *,
        seq: int | None = None,
        pid: int | None = None,
        has_hook: bool | None = None,
        error: str | None = None,
        traceback: str | None = None,
    ) -> str | None:
        """A worker says how it is (`initializing`, `running`, `failed`), in one transaction:
        its row moves on if the state table allows it (a late report never revives an ended
        worker), the job learns whether the predictor has a hook, and a worker that failed to
        load the predictor ends the job (`status_worker_error`: its siblings would most likely
        fail the same way). Returns the reason if this report ended the job."""
        with self.write() as conn:
            # The job row first (the lock order): a failure changes the job's status.
            job = jobrows.lock(conn, job_id)
            if seq is not None and claim(conn, job_id, worker_id, LOOP, seq, "state") is not None:
                return None  # acted on already
            workerrows.move(conn, worker_id, state, pid=pid, error_message=error)
            if has_hook is not None and job.has_hook is None:
                conn.execute(
                    t.jobs.update()
                    .where(t.jobs.c.job_id == job_id, t.jobs.c.has_hook.is_(None))
                    .values(has_hook=has_hook)
                )
            reason = None
            if state is WorkerState.FAILED:
                message = f"worker {worker_id} failed to initialise the predictor: {error}"
                kind = "batchapi.worker_init_failed"
                status = JobStatus.WORKER_ERROR
                if jobrows.transition(conn, job_id, status, kind, message, traceback):
                    reason = message
            if seq is not None:
                record(conn, worker_id, LOOP, seq, {"op": "state", "ok": True})
            return reason

    def ship_logs(
        self,
        job_id: str,
        worker_id: str,
        lines: list[list[Any]],
        dropped: int = 0,
        seq: int | None = None,
        max_bytes: int = logs.DEFAULT_MAX_BYTES,
    ) -> int:
        """Store the lines of one shipment (in chunks, within the job's log budget of
        `max_bytes`: see `logs.write`), with a warning line if the worker says it dropped
        some; a shipment sent again (same `seq`) is not stored twice. Returns how many
        entries the shipment stored."""
        if dropped > 0:
            lines = [
                *lines,
                [
                    lines[-1][0] if lines else time.time(),
                    "stderr",
                    "WARNING",
                    None,
                    f"cortex: {dropped} log lines were dropped: the worker printed faster than "
                    "they could be shipped, or the server was unreachable",
                ],
            ]
        # Encoded and compressed before the write lock; a copy of a shipment pays that for
        # nothing, which is rare.
        shipment = logs.prepare(self, job_id, lines, max_bytes)
        with self.write() as conn:
            if seq is not None:
                kept = claim(conn, job_id, worker_id, LOGS, seq, "logs")
                if kept is not None:
                    return int(kept["stored"])
            stored = logs.write(conn, job_id, worker_id, shipment, max_bytes) if lines else 0
            if seq is not None:
                record(conn, worker_id, LOGS, seq, {"op": "logs", "stored": stored})
            return stored

    def worker_finished(self, worker_id: str) -> bool:
        """Whether the last answer the worker got ended its work: it was told that nothing is
        left to lease, or its report of the hook was taken. Its exit is then a clean one,
        even where the exit code cannot be known (a worker adopted after a restart)."""
        with self.read() as conn:
            final = conn.execute(
                sa.select(t.worker_replies.c.final).where(
                    t.worker_replies.c.worker_id == worker_id,
                    t.worker_replies.c.channel == LOOP,
                )
            ).scalar()
        return bool(final)


# -- helpers that run inside a caller's transaction ---------------------------------------------


def claim(
    conn: Connection, job_id: str, worker_id: str, channel: str, seq: int, op: str
) -> Reply | None:
    """Take the worker's channel for request `seq`: the answer kept for it if this request was
    acted on already (answer it with that, and do nothing else), or None if it is new (act,
    then `record` the answer in the same transaction). A request older than the last one is
    refused (`StaleRequest`): the worker has moved on, so nobody waits for its answer.

    Runs after the job row is locked, if it is (the lock order: job, worker, batches). The
    channel's row is taken FOR UPDATE, so that a request and its copy (sent again while the
    first was still being worked on) are serialised: the copy waits for the first to commit,
    then finds its answer. Two first requests of a channel both insert its row: ON CONFLICT
    makes the second wait for the first, insert nothing and read the row as the first left it.
    """
    current = {"w": worker_id, "c": channel}
    row = conn.execute(_CURRENT, current).first()
    if row is None:
        inserted = conn.execute(
            engine.insert_ignore(conn, t.worker_replies).values(
                worker_id=worker_id, channel=channel, job_id=job_id, seq=seq, reply=None
            )
        )
        if inserted.rowcount == 1:
            return None
        row = conn.execute(_CURRENT, current).one()
    if seq < row.seq:
        raise errors.StaleRequest(
            f"request {seq} of worker {worker_id} ({channel}) comes after request {row.seq}: "
            "it was sent again after the worker moved on"
        )
    if seq == row.seq and row.reply is not None:
        kept: Reply = json.loads(row.reply)
        if kept.get("op") != op:  # one number, two requests: a worker that lost count
            raise errors.StaleRequest(
                f"request {seq} of worker {worker_id} was a {kept.get('op')} request, not {op}"
            )
        return kept
    # A new request, or one whose `seq` was taken by a transaction that ended without an
    # answer (a bare lease that found nothing goes on in a second transaction): act on it.
    return None


def record(
    conn: Connection, worker_id: str, channel: str, seq: int, reply: Reply, final: bool = False
) -> None:
    """Keep `reply` as the answer to request `seq` (its row was taken by `claim`)."""
    answer = json.dumps(reply, separators=(",", ":"))
    conn.execute(_RECORD, {"w": worker_id, "c": channel, "s": seq, "r": answer, "f": final})


# A worker request's statements, built once.
_CURRENT = (
    sa.select(t.worker_replies.c.seq, t.worker_replies.c.reply)
    .where(
        t.worker_replies.c.worker_id == sa.bindparam("w"),
        t.worker_replies.c.channel == sa.bindparam("c"),
    )
    .with_for_update()
)
_RECORD = (
    t.worker_replies.update()
    .where(
        t.worker_replies.c.worker_id == sa.bindparam("w"),
        t.worker_replies.c.channel == sa.bindparam("c"),
    )
    .values(seq=sa.bindparam("s"), reply=sa.bindparam("r"), final=sa.bindparam("f"))
)
