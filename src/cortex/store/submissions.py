"""Submitting jobs: a job with all its batches in one transaction, or a job whose file dataset
one replica enqueues chunk by chunk (and another takes over if that replica goes)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from cortex import errors
from cortex.jobs import JobStatus
from cortex.store import apis, batchrows, engine, jobrows, workerrows
from cortex.store import tables as t
from cortex.store.records import Job


class SubmissionStore(engine.BaseStore):
    """`Store`'s job creation and enqueuing."""

    def create_job(
        self,
        *,
        job_id: str,
        api_name: str,
        workers: int,
        config: dict[str, Any] | None,
        timeout_s: int | None,
        max_attempts: int,
        worker_token: str,
        payloads: Iterable[str],
        replica_id: str | None,
        retry_of: str | None = None,
        priority: int = 0,
        min_workers: int = 0,
    ) -> Job:
        """Store a job, all of its batches and its workers' rows in one transaction, then mark
        it running (a retry of failed batches, whose payloads are already stored).

        If the payloads iterator raises, nothing is written. The service leaves its workers to
        the scheduler (`cortex.pool`), which places them as capacity allows; with `replica_id`,
        rows for all of them are written here, owned by that replica, holding no capacity.
        """
        now = time.time()
        with self.write() as conn:
            _insert_job(
                conn,
                now,
                job_id=job_id,
                api_name=api_name,
                workers=workers,
                config_json=None if config is None else json.dumps(config),
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                worker_token=worker_token,
                retry_of=retry_of,
                priority=priority,
                min_workers=min_workers,
            )
            total = 0
            chunk: list[str] = []
            for payload in payloads:
                chunk.append(payload)
                if len(chunk) >= batchrows.INSERT_CHUNK:
                    batchrows.insert(conn, job_id, total, chunk)
                    total += len(chunk)
                    chunk = []
            if chunk:
                batchrows.insert(conn, job_id, total, chunk)
                total += len(chunk)
            conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id)
                .values(
                    total_batch_count=total,
                    enqueue_done=True,
                    status=JobStatus.RUNNING.value,
                )
            )
            if replica_id is not None:
                workerrows.insert(conn, job_id, range(workers), replica_id, now)
            return jobrows.get(conn, job_id)

    def create_enqueuing_job(
        self,
        *,
        job_id: str,
        api_name: str,
        workers: int,
        config: dict[str, Any] | None,
        timeout_s: int | None,
        max_attempts: int,
        worker_token: str,
        dataset: dict[str, Any],
        replica_id: str,
        priority: int = 0,
        min_workers: int = 0,
    ) -> Job:
        """Store a job whose dataset (a file dataset, or an item list being written by the
        request) `replica_id` enqueues from now on (`append_batches`, then `finish_enqueue`).
        It has no batches and no workers yet."""
        with self.write() as conn:
            _insert_job(
                conn,
                time.time(),
                job_id=job_id,
                api_name=api_name,
                workers=workers,
                config_json=None if config is None else json.dumps(config),
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                worker_token=worker_token,
                dataset_json=json.dumps(dataset),
                enqueue_owner=replica_id,
                priority=priority,
                min_workers=min_workers,
            )
            return jobrows.get(conn, job_id)

    def append_batches(
        self, job_id: str, payloads: list[str], items: int, owner: str
    ) -> Job | None:
        """Write the next batches of an enqueuing job and move its resume cursor by `items`,
        in one transaction; None (and nothing written) if the job is no longer enqueuing or
        another replica's enqueuer took it over."""
        with self.write() as conn:
            job = jobrows.lock(conn, job_id, missing_ok=True)
            if job is None or not _enqueuing_by(job, owner):
                return None
            start = job.total_batch_count
            for offset in range(0, len(payloads), batchrows.INSERT_CHUNK):
                batchrows.insert(
                    conn, job_id, start + offset, payloads[offset : offset + batchrows.INSERT_CHUNK]
                )
            conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id)
                .values(
                    total_batch_count=start + len(payloads),
                    enqueued_items=job.enqueued_items + items,
                )
            )
            return jobrows.get(conn, job_id)

    def finish_enqueue(self, job_id: str, owner: str, empty_message: str) -> Job | None:
        """Every batch is written: the job runs (or, with none, failed while enqueuing);
        None if the job is no longer this owner's to finish."""
        with self.write() as conn:
            job = jobrows.lock(conn, job_id, missing_ok=True)
            if job is None or not _enqueuing_by(job, owner):
                return None
            if job.total_batch_count == 0:
                jobrows.transition(
                    conn,
                    job_id,
                    JobStatus.ENQUEUE_FAILED,
                    "batchapi.no_data_found",
                    empty_message,
                )
            else:
                conn.execute(
                    t.jobs.update()
                    .where(t.jobs.c.job_id == job_id)
                    .values(enqueue_done=True, status=JobStatus.RUNNING.value)
                )
            return jobrows.get(conn, job_id)

    def unfinished_enqueues(self) -> list[Job]:
        """Jobs whose file dataset is still being enqueued (or should be)."""
        with self.read() as conn:
            rows = conn.execute(
                sa.select(t.jobs).where(
                    t.jobs.c.status == JobStatus.ENQUEUING.value,
                    t.jobs.c.enqueue_done.is_(False),
                    t.jobs.c.dataset_json.is_not(None),
                )
            ).all()
        return [Job.from_row(row) for row in rows]

    def take_enqueue(self, job_id: str, old_owner: str | None, new_owner: str) -> bool:
        """Take over the enqueuing of a job from a replica that is gone (compare-and-set)."""
        with self.write() as conn:
            updated = conn.execute(
                t.jobs.update()
                .where(
                    t.jobs.c.job_id == job_id,
                    t.jobs.c.status == JobStatus.ENQUEUING.value,
                    t.jobs.c.enqueue_owner == old_owner
                    if old_owner is not None
                    else t.jobs.c.enqueue_owner.is_(None),
                )
                .values(enqueue_owner=new_owner)
            )
            return updated.rowcount == 1


# -- helpers that run inside a caller's transaction ---------------------------------------------


def _enqueuing_by(job: Job, owner: str) -> bool:
    return job.status is JobStatus.ENQUEUING and not job.enqueue_done and job.enqueue_owner == owner


def _insert_job(conn: Connection, now: float, *, api_name: str, **values: Any) -> None:
    """A new job's row, enqueuing, running the API's spec as deployed now.

    FOR SHARE on the API row: a concurrent deploy cannot drop the spec this job names, nor a
    delete leave the job without its API."""
    api = apis.lock(conn, api_name, share=True)
    if api is None:
        raise errors.ApiNotDeployed(api_name)
    conn.execute(
        t.jobs.insert().values(
            api_name=api_name,
            spec_id=apis.version_for_new_job(api, api_name),
            status=JobStatus.ENQUEUING.value,
            start_time=now,
            **values,
        )
    )
