"""Retention: ended jobs leave the store with everything they hold, a chunk at a time."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from cortex.jobs import JobStatus
from cortex.store import Store
from cortex.store import tables as t
from cortex.store.logs import LogStore

API_SPEC: dict[str, Any] = {"name": "api", "kind": "BatchAPI", "predictor": {"config": {}}}


def _job(store: Store, job_id: str, batches: int = 3) -> str:
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=2,
        config=None,
        timeout_s=None,
        max_attempts=1,
        worker_token="token",
        payloads=(f"[{i}]" for i in range(batches)),
        replica_id="r1",
    )
    LogStore(store).append(job_id, f"{job_id}-0", [[1.0, "stdout", None, None, "hello"]])
    with store.engine.begin() as conn:  # what predict returned for the first batch
        line = '{"batch_id":"b","index":0,"result":1}\n'
        conn.execute(t.batch_results.insert().values(job_id=job_id, seq=0, lines=line, size=1))
    return job_id


def _rows(store: Store, job_id: str) -> dict[str, int]:
    tables = (
        t.jobs,
        t.batches,
        t.batch_payloads,
        t.batch_results,
        t.workers,
        t.worker_replies,
        t.log_chunks,
        t.log_totals,
    )
    with store.engine.connect() as conn:
        return {
            table.name: conn.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.job_id == job_id)
            ).scalar_one()
            for table in tables
        }


def _specs(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(t.api_specs.c.spec_id)).scalars())


def test_ended_jobs_past_retention_go_with_everything_they_hold(store: Store) -> None:
    store.put_api("api", "v1", API_SPEC, b"one")
    old = _job(store, "old")
    store.put_api("api", "v2", API_SPEC, b"two")  # v1 is kept while "old" refers to it
    running = _job(store, "running")
    store.set_status(old, JobStatus.STOPPED)
    ended = store.get_job(old)
    assert ended is not None and ended.end_time is not None
    cutoff = ended.end_time + 1e-6
    recent = _job(store, "recent")
    store.set_status(recent, JobStatus.STOPPED)
    later = store.get_job(recent)
    assert later is not None and later.end_time is not None and later.end_time > cutoff
    assert _specs(store) == {"v1", "v2"}

    gone = store.prune_jobs(ended_before_ts=cutoff)

    assert gone == [old]
    assert set(_rows(store, old).values()) == {0}
    assert store.get_job(old) is None
    for kept in (running, recent):
        rows = _rows(store, kept)
        assert rows["jobs"] == 1 and rows["batches"] == 3 and rows["log_chunks"] == 1
        assert rows["batch_results"] == 1
    assert _specs(store) == {"v2"}  # nothing refers to v1 any more
    assert store.prune_jobs(ended_before_ts=cutoff) == []


def test_a_big_job_is_pruned_a_chunk_at_a_time_and_reads_as_ended_until_gone(
    store: Store,
) -> None:
    store.put_api("api", "v1", API_SPEC, b"one")
    big = _job(store, "big", batches=12_000)
    store.set_status(big, JobStatus.STOPPED)
    cutoff = time.time() + 1

    calls = 0
    while store.prune_jobs(ended_before_ts=cutoff, max_transactions=2) != [big]:
        calls += 1
        job = store.get_job(big)  # still whole to a reader: its own row goes last
        assert job is not None and job.status is JobStatus.STOPPED
        assert calls < 40
    # 12,000 payloads (256 a transaction) and batches (5000), two transactions a call.
    assert calls > 10
    assert set(_rows(store, big).values()) == {0}
