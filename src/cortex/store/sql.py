"""The store over SQLAlchemy Core: SQLite (WAL, the default) or PostgreSQL.

`Store` is put together here from one part per area, each in a module of its own with the
helpers that run inside its transactions: `engine` (the engine, its transactions, SQLite's
settings), `apis` (deploys), `submissions` (creating jobs, enqueuing their batches), `jobrows`
(reading, locking and listing jobs, their status transitions), `workerrows`, `queue` (leases,
results, expiry, completion), `deadlines` (batch_timeout's backstop), `budget` (failure
budgets), `protocol` (the worker requests' numbers and kept answers, state reports, log
shipments), `batchrows` (payloads, failed batches, pruning), `resultrows` (collected results,
the output step of completion) and `retention` (deleting ended jobs).

State transitions are written once; the dialects differ only where they must. On SQLite
every write transaction runs under one process-wide lock, because SQLite has one writer anyway
and waiting on a Python lock is cheaper than retrying on `database is locked`. Only the server
opens the store; workers reach it through the worker HTTP API.

On PostgreSQL several server processes write at once, under READ COMMITTED. The rules that keep
that correct (SQLite ignores the row locks and gets the same order from its one writer):

- The job row is the lock for everything about a job. A transaction that changes a batch's
  state, a job's counters, status or completion first locks the job row `FOR UPDATE`, then
  re-reads what it decides on. The one exception is a bare lease (no results to report): it
  takes `FOR KEY SHARE`, which only keeps the status from changing, so that many workers of one
  job lease side by side and `SKIP LOCKED` keeps them off each other's batches.
- Locks are taken in one order: API row, job row, worker row, batch rows. A transaction that
  locks nothing first never waits on a job row after it holds a batch row.
- Every write that depends on a row's state says so in its WHERE clause (a compare-and-set),
  and the rows it changed are counted from `rowcount`, not from an earlier read.
"""

from __future__ import annotations

from cortex.store import (
    apis,
    batchrows,
    deadlines,
    jobrows,
    outbox,
    pool,
    protocol,
    queue,
    resultrows,
    retention,
    submissions,
    workerrows,
)
from cortex.store.engine import display_url, engine_url, insert_ignore
from cortex.store.jobrows import JobProgress
from cortex.store.workerrows import worker_record

# Names other modules import from here.
__all__ = [
    "JobProgress",
    "Store",
    "display_url",
    "engine_url",
    "insert_ignore",
    "worker_record",
]


class Store(
    apis.ApiStore,
    submissions.SubmissionStore,
    jobrows.JobStore,
    outbox.OutboxStore,
    workerrows.WorkerStore,
    queue.QueueStore,
    deadlines.DeadlineStore,
    protocol.ProtocolStore,
    batchrows.BatchStore,
    resultrows.ResultStore,
    pool.PoolStore,
    retention.RetentionStore,
):
    """Every piece of state: APIs, jobs, the batch queue and workers."""
