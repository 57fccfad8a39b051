"""Store-wide counts for `/metrics`: jobs by status, batch totals, queue depth and workers, per
API, in four grouped reads (no method of `Store` changes; it only reads its tables)."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa

from cortex.jobs import IN_PROGRESS
from cortex.store import tables as t
from cortex.store.engine import BaseStore

_IN_PROGRESS = sorted(s.value for s in IN_PROGRESS)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the store holds now, keyed by API name (and status or state)."""

    apis: list[str]
    jobs: dict[tuple[str, str], int]  # (api, job status) -> jobs
    succeeded: dict[str, int]  # api -> batches succeeded, over all its jobs
    failed: dict[str, int]  # api -> batches that used all their attempts
    batches: dict[tuple[str, str], int]  # (api, queued|leased) -> batches of in-progress jobs
    workers: dict[tuple[str, str], int]  # (api, worker state) -> workers of in-progress jobs


def snapshot(store: BaseStore) -> Snapshot:
    """Read the counts on one connection.

    The counters come from the job rows, which change in the same transaction as the batch rows
    they count: they agree with every status answer, survive restarts, and are the same
    whichever replica reads them. Queue depth and workers are only read for in-progress jobs
    (by the `status` index), so their cost follows the running work, not the history; the job
    counts scan the jobs table once, one row per job ever submitted."""
    per_job = sa.select(
        t.jobs.c.api_name,
        t.jobs.c.status,
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(t.jobs.c.succeeded), 0),
        sa.func.coalesce(sa.func.sum(t.jobs.c.failed), 0),
    ).group_by(t.jobs.c.api_name, t.jobs.c.status)
    running = t.jobs.c.status.in_(_IN_PROGRESS)
    per_batch = (
        sa.select(t.jobs.c.api_name, t.batches.c.state, sa.func.count())
        .select_from(t.jobs.join(t.batches, t.batches.c.job_id == t.jobs.c.job_id))
        .where(running, t.batches.c.state.in_(["queued", "leased"]))
        .group_by(t.jobs.c.api_name, t.batches.c.state)
    )
    per_worker = (
        sa.select(t.jobs.c.api_name, t.workers.c.state, sa.func.count())
        .select_from(t.jobs.join(t.workers, t.workers.c.job_id == t.jobs.c.job_id))
        .where(running)
        .group_by(t.jobs.c.api_name, t.workers.c.state)
    )
    with store.engine.connect() as conn:
        apis = [row[0] for row in conn.execute(sa.select(t.apis.c.name).order_by(t.apis.c.name))]
        jobs: dict[tuple[str, str], int] = {}
        succeeded: dict[str, int] = {}
        failed: dict[str, int] = {}
        for api, status, count, ok, bad in conn.execute(per_job):
            jobs[(api, status)] = int(count)
            succeeded[api] = succeeded.get(api, 0) + int(ok)
            failed[api] = failed.get(api, 0) + int(bad)
        batches = {(api, state): int(n) for api, state, n in conn.execute(per_batch)}
        workers = {(api, state): int(n) for api, state, n in conn.execute(per_worker)}
    return Snapshot(apis, jobs, succeeded, failed, batches, workers)
