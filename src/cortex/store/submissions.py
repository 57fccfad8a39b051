"""Submitting jobs: a job with all its batches in one transaction, or a job whose file dataset
one replica enqueues chunk by chunk (and another takes over if that replica goes)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from cortex import errors
from cortex.jobs import JobStatus
from cortex.store import apis, batchrows, engine, jobrows, outbox, workerrows
from cortex.store import tables as t
from cortex.store.records import Job

# How long an `Idempotency-Key` names the job it created.
IDEMPOTENCY_TTL_S = 86400.0


@dataclasses.dataclass(frozen=True)
class Extras:
    """What a submission may add to its job beyond the spec's fields: metadata, a webhook,
    an idempotency key with the digest of the body it came with, a time limit per batch, a
    failure budget, and where its results go."""

    metadata: dict[str, str] | None = None
    webhook: dict[str, Any] | None = None
    idempotency_key: str | None = None
    body_digest: str = ""
    batch_timeout_s: int | None = None
    max_failed_batches: int | None = None
    output_path: str | None = None


NO_EXTRAS = Extras()


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
        extras: Extras = NO_EXTRAS,
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
                extras=extras,
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
            job = jobrows.get(conn, job_id)
            outbox.record_event(conn, job, JobStatus.RUNNING)
            return job

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
        extras: Extras = NO_EXTRAS,
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
                extras=extras,
                priority=priority,
                min_workers=min_workers,
            )
            return jobrows.get(conn, job_id)

    def append_batches(
        self,
        job_id: str,
        payloads: list[str],
        items: int,
        owner: str,
        sizes: list[int] | None = None,
    ) -> Job | None:
        """Write the next batches of an enqueuing job and move its resume cursor by `items`,
        in one transaction; None (and nothing written) if the job is no longer enqueuing or
        another replica's enqueuer took it over. `sizes`: the payloads' sizes, where they
        are not their stored text's (a reference's is that of the lines it names)."""
        with self.write() as conn:
            job = jobrows.lock(conn, job_id, missing_ok=True)
            if job is None or not _enqueuing_by(job, owner):
                return None
            start = job.total_batch_count
            for offset in range(0, len(payloads), batchrows.INSERT_CHUNK):
                end = offset + batchrows.INSERT_CHUNK
                batchrows.insert(
                    conn,
                    job_id,
                    start + offset,
                    payloads[offset:end],
                    None if sizes is None else sizes[offset:end],
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
                outbox.record_event(conn, job, JobStatus.RUNNING)
            return jobrows.get(conn, job_id)

    def idempotent_job(self, api_name: str, key: str, now: float) -> tuple[str, str] | None:
        """The digest of the body and the job of an idempotency key used on this API in the
        last `IDEMPOTENCY_TTL_S`, or None."""
        keys = t.idempotency_keys
        with self.read() as conn:
            row = conn.execute(
                sa.select(keys.c.body_digest, keys.c.job_id).where(
                    keys.c.api_name == api_name,
                    keys.c.key == key,
                    keys.c.created_at >= now - IDEMPOTENCY_TTL_S,
                )
            ).first()
        return None if row is None else (row.body_digest, row.job_id)

    def release_idempotency_key(self, api_name: str, key: str, job_id: str) -> None:
        """Let a key name a new job: the one it named (`job_id`) is dropped from it."""
        keys = t.idempotency_keys
        with self.write() as conn:
            conn.execute(
                keys.delete().where(
                    keys.c.api_name == api_name, keys.c.key == key, keys.c.job_id == job_id
                )
            )

    def prune_idempotency_keys(self, now: float) -> int:
        """Forget the idempotency keys past their time."""
        keys = t.idempotency_keys
        with self.write() as conn:
            return int(
                conn.execute(
                    keys.delete().where(keys.c.created_at < now - IDEMPOTENCY_TTL_S)
                ).rowcount
            )

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


def _insert_job(
    conn: Connection, now: float, *, api_name: str, extras: Extras, **values: Any
) -> None:
    """A new job's row, enqueuing, running the API's spec as deployed now, with its extras:
    metadata (and its rows), webhook, limits, output, idempotency key.

    FOR SHARE on the API row: a concurrent deploy cannot drop the spec this job names, nor a
    delete leave the job without its API."""
    api = apis.lock(conn, api_name, share=True)
    if api is None:
        raise errors.ApiNotDeployed(api_name)
    if extras.idempotency_key is not None:
        _take_key(conn, now, api_name, extras, values["job_id"])
    conn.execute(
        t.jobs.insert().values(
            api_name=api_name,
            spec_id=apis.version_for_new_job(api, api_name),
            status=JobStatus.ENQUEUING.value,
            start_time=now,
            metadata_json=None if extras.metadata is None else json.dumps(extras.metadata),
            webhook_json=None if extras.webhook is None else json.dumps(extras.webhook),
            batch_timeout_s=extras.batch_timeout_s,
            max_failed_batches=extras.max_failed_batches,
            output_json=None
            if extras.output_path is None
            else json.dumps({"path": extras.output_path}),
            **values,
        )
    )
    if extras.metadata:
        job_id = values["job_id"]
        rows = [{"job_id": job_id, "key": k, "value": v} for k, v in extras.metadata.items()]
        conn.execute(t.job_metadata.insert(), rows)


def _take_key(conn: Connection, now: float, api_name: str, extras: Extras, job_id: str) -> None:
    """Store the submission's idempotency key for its job, or raise KeyTaken if a submission
    holds it already. The insert waits for a concurrent one of the same key (PostgreSQL's
    ON CONFLICT; SQLite's single writer) and then inserts nothing: of two concurrent POSTs
    with one key, one creates its job and the other answers it."""
    keys = t.idempotency_keys
    key = (keys.c.api_name == api_name, keys.c.key == extras.idempotency_key)
    # A key past its time names nothing any more (pruning may not have reached it yet).
    conn.execute(keys.delete().where(*key, keys.c.created_at < now - IDEMPOTENCY_TTL_S))
    inserted = conn.execute(
        engine.insert_ignore(conn, keys).values(
            api_name=api_name,
            key=extras.idempotency_key,
            body_digest=extras.body_digest,
            job_id=job_id,
            created_at=now,
        )
    )
    if inserted.rowcount != 1:
        raise errors.KeyTaken(extras.idempotency_key)
