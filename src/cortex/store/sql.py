"""The store over SQLAlchemy Core: SQLite (WAL, the default) or PostgreSQL.

State transitions are written once here; the dialects differ only where they must. On SQLite
every write transaction runs under one process-wide lock, because SQLite has one writer anyway
and waiting on a Python lock is cheaper than retrying on `database is locked`. Only the server
opens the store; workers reach it through the worker HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex import errors
from cortex.jobs import BatchState, JobStatus, WorkerState, can_transition
from cortex.store import tables as t
from cortex.store.records import (
    ApiRecord,
    BatchResult,
    Job,
    LeasedBatch,
    LeaseResult,
    WorkerRecord,
)

_INSERT_CHUNK = 2000
_ACTIVE = (BatchState.QUEUED.value, BatchState.LEASED.value)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = sa.create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            self._write_lock: contextlib.AbstractContextManager[Any] = threading.RLock()
        else:
            self.engine = sa.create_engine(url, pool_size=10, max_overflow=20)
            self._write_lock = contextlib.nullcontext()

    def create_schema(self) -> None:
        t.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    # -- APIs -------------------------------------------------------------------------------

    def put_api(self, name: str, spec_id: str, spec: dict[str, Any], archive: bytes) -> str:
        """Record a deploy; returns "created", "updated" or "up_to_date"."""
        now = time.time()
        with self._write() as conn:
            current = conn.execute(sa.select(t.apis.c.spec_id).where(t.apis.c.name == name))
            row = current.first()
            if row is not None and row.spec_id == spec_id:
                return "up_to_date"
            known = conn.execute(
                sa.select(t.api_specs.c.spec_id).where(t.api_specs.c.spec_id == spec_id)
            ).first()
            if known is None:
                conn.execute(
                    t.api_specs.insert().values(
                        spec_id=spec_id,
                        api_name=name,
                        spec_json=json.dumps(spec),
                        archive=archive,
                        created_at=now,
                    )
                )
            if row is None:
                conn.execute(
                    t.apis.insert().values(
                        name=name, spec_id=spec_id, created_at=now, updated_at=now
                    )
                )
                return "created"
            conn.execute(
                t.apis.update().where(t.apis.c.name == name).values(spec_id=spec_id, updated_at=now)
            )
            # Drop versions that neither the API nor any job refers to any more.
            in_use = sa.select(t.jobs.c.spec_id).where(t.jobs.c.api_name == name)
            conn.execute(
                t.api_specs.delete().where(
                    t.api_specs.c.api_name == name,
                    t.api_specs.c.spec_id != spec_id,
                    t.api_specs.c.spec_id.not_in(in_use),
                )
            )
            return "updated"

    def get_api(self, name: str) -> ApiRecord | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.apis, t.api_specs.c.spec_json)
                .join(t.api_specs, t.api_specs.c.spec_id == t.apis.c.spec_id)
                .where(t.apis.c.name == name)
            ).first()
        return None if row is None else _api_record(row)

    def list_apis(self) -> list[ApiRecord]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.apis, t.api_specs.c.spec_json)
                .join(t.api_specs, t.api_specs.c.spec_id == t.apis.c.spec_id)
                .order_by(t.apis.c.name)
            ).all()
        return [_api_record(row) for row in rows]

    def get_spec(self, spec_id: str) -> tuple[dict[str, Any], bytes]:
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.api_specs.c.spec_json, t.api_specs.c.archive).where(
                    t.api_specs.c.spec_id == spec_id
                )
            ).one()
        return json.loads(row.spec_json), bytes(row.archive)

    def delete_api(self, name: str) -> None:
        """Erase an API and its job history (its jobs must have been stopped)."""
        with self._write() as conn:
            job_ids = sa.select(t.jobs.c.job_id).where(t.jobs.c.api_name == name)
            conn.execute(t.batches.delete().where(t.batches.c.job_id.in_(job_ids)))
            conn.execute(t.workers.delete().where(t.workers.c.job_id.in_(job_ids)))
            conn.execute(t.jobs.delete().where(t.jobs.c.api_name == name))
            conn.execute(t.api_specs.delete().where(t.api_specs.c.api_name == name))
            conn.execute(t.apis.delete().where(t.apis.c.name == name))

    # -- jobs -------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        job_id: str,
        api_name: str,
        spec_id: str,
        workers: int,
        config: dict[str, Any] | None,
        timeout_s: int | None,
        max_attempts: int,
        worker_token: str,
        payloads: Iterable[str],
        retry_of: str | None = None,
    ) -> Job:
        """Store a job and all of its batches in one transaction, then mark it running.

        An inline item list is already in memory, so writing it before answering costs little
        and means a job id, once returned, names durable batches. If the payloads iterator
        raises (an item over the size limit), nothing is written.
        """
        now = time.time()
        with self._write() as conn:
            conn.execute(
                t.jobs.insert().values(
                    job_id=job_id,
                    api_name=api_name,
                    spec_id=spec_id,
                    status=JobStatus.ENQUEUING.value,
                    workers=workers,
                    config_json=None if config is None else json.dumps(config),
                    timeout_s=timeout_s,
                    max_attempts=max_attempts,
                    start_time=now,
                    worker_token=worker_token,
                    retry_of=retry_of,
                )
            )
            total = 0
            rows: list[dict[str, Any]] = []
            for payload in payloads:
                rows.append(
                    {
                        "job_id": job_id,
                        "seq": total,
                        "batch_id": str(uuid.uuid4()),
                        "payload": payload,
                        "state": BatchState.QUEUED.value,
                    }
                )
                total += 1
                if len(rows) >= _INSERT_CHUNK:
                    conn.execute(t.batches.insert(), rows)
                    rows = []
            if rows:
                conn.execute(t.batches.insert(), rows)
            conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id)
                .values(
                    total_batch_count=total,
                    enqueue_done=True,
                    status=JobStatus.RUNNING.value,
                )
            )
            return _get_job(conn, job_id)

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(sa.select(t.jobs).where(t.jobs.c.job_id == job_id)).first()
        return None if row is None else Job.from_row(row)

    def list_jobs(self, api_name: str, limit: int = 100) -> list[Job]:
        """In-progress jobs first, then the newest others, at most `limit` in all."""
        in_progress = [s.value for s in JobStatus if s.in_progress]
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.jobs)
                .where(t.jobs.c.api_name == api_name)
                .order_by(t.jobs.c.status.in_(in_progress).desc(), t.jobs.c.start_time.desc())
                .limit(limit)
            ).all()
        return [Job.from_row(row) for row in rows]

    def in_progress_jobs(self) -> list[Job]:
        in_progress = [s.value for s in JobStatus if s.in_progress]
        with self._read() as conn:
            rows = conn.execute(sa.select(t.jobs).where(t.jobs.c.status.in_(in_progress))).all()
        return [Job.from_row(row) for row in rows]

    def set_status(
        self,
        job_id: str,
        new: JobStatus,
        *,
        error_kind: str | None = None,
        error_message: str | None = None,
        error_traceback: str | None = None,
    ) -> bool:
        """Move a job to `new` if the state machine allows it; False if it does not (for
        example the job already ended: the first terminal status wins)."""
        with self._write() as conn:
            return _set_status(conn, job_id, new, error_kind, error_message, error_traceback)

    # -- workers ----------------------------------------------------------------------------

    def add_worker(self, job_id: str, worker_id: str) -> None:
        now = time.time()
        with self._write() as conn:
            conn.execute(
                t.workers.insert().values(
                    worker_id=worker_id,
                    job_id=job_id,
                    state=WorkerState.PENDING.value,
                    started_at=now,
                    updated_at=now,
                )
            )

    def update_worker(
        self,
        worker_id: str,
        state: WorkerState,
        *,
        pid: int | None = None,
        exit_code: int | None = None,
        error_message: str | None = None,
    ) -> None:
        """Record a worker's new state. A worker that has ended stays ended."""
        values: dict[str, Any] = {"state": state.value, "updated_at": time.time()}
        if pid is not None:
            values["pid"] = pid
        if exit_code is not None:
            values["exit_code"] = exit_code
        if error_message is not None:
            values["error_message"] = error_message
        ended = (WorkerState.SUCCEEDED.value, WorkerState.FAILED.value)
        with self._write() as conn:
            conn.execute(
                t.workers.update()
                .where(t.workers.c.worker_id == worker_id, t.workers.c.state.not_in(ended))
                .values(**values)
            )

    def set_has_hook(self, job_id: str, has_hook: bool) -> None:
        with self._write() as conn:
            conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id, t.jobs.c.has_hook.is_(None))
                .values(has_hook=has_hook)
            )

    def get_worker(self, worker_id: str) -> WorkerRecord | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.workers).where(t.workers.c.worker_id == worker_id)
            ).first()
        return None if row is None else _worker_record(row)

    def list_workers(self, job_id: str) -> list[WorkerRecord]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.workers)
                .where(t.workers.c.job_id == job_id)
                .order_by(t.workers.c.started_at)
            ).all()
        return [_worker_record(r) for r in rows]

    def worker_counts(self, job_id: str) -> dict[str, int]:
        counts = {state.value: 0 for state in WorkerState}
        with self._read() as conn:
            for state, n in conn.execute(
                sa.select(t.workers.c.state, sa.func.count())
                .where(t.workers.c.job_id == job_id)
                .group_by(t.workers.c.state)
            ):
                counts[state] = n
        return counts

    # -- the queue --------------------------------------------------------------------------

    def lease(
        self,
        job_id: str,
        worker_id: str,
        results: list[BatchResult],
        max_batches: int,
        lease_s: float,
    ) -> LeaseResult:
        """Record a worker's results and lease it up to `max_batches` more, in one transaction.

        When the results end the job's last batch, the completion is decided here too: a job
        whose predictor has `on_job_complete` is claimed by this worker (it alone gets
        `run_hook`); any other job gets its final status in this same transaction.
        """
        now = time.time()
        with self._write() as conn:
            job = _get_job(conn, job_id)
            if job.status.terminal:
                return LeaseResult(batches=[], done=True)
            for result in results:
                _record_result(conn, job, worker_id, result)

            leased: list[LeasedBatch] = []
            if max_batches > 0 and job.status is JobStatus.RUNNING:
                candidates = conn.execute(
                    sa.select(
                        t.batches.c.seq,
                        t.batches.c.batch_id,
                        t.batches.c.payload,
                        t.batches.c.attempts,
                    )
                    .where(
                        t.batches.c.job_id == job_id,
                        t.batches.c.state == BatchState.QUEUED.value,
                    )
                    .order_by(t.batches.c.seq)
                    .limit(max_batches)
                    .with_for_update(skip_locked=True)
                ).all()
                if candidates:
                    conn.execute(
                        t.batches.update()
                        .where(
                            t.batches.c.job_id == job_id,
                            t.batches.c.seq.in_([c.seq for c in candidates]),
                        )
                        .values(
                            state=BatchState.LEASED.value,
                            lease_owner=worker_id,
                            lease_expires_at=now + lease_s,
                            attempts=t.batches.c.attempts + 1,
                        )
                    )
                    leased = [
                        LeasedBatch(c.batch_id, c.payload, c.attempts + 1) for c in candidates
                    ]
            if leased:
                return LeaseResult(batches=leased)
            return _maybe_complete(conn, job_id, worker_id)

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend every lease the worker holds; False if the job has ended."""
        with self._write() as conn:
            job = _get_job(conn, job_id)
            if job.status.terminal:
                return False
            conn.execute(
                t.batches.update()
                .where(
                    t.batches.c.job_id == job_id,
                    t.batches.c.state == BatchState.LEASED.value,
                    t.batches.c.lease_owner == worker_id,
                )
                .values(lease_expires_at=time.time() + lease_s)
            )
            return True

    def finish_hook(
        self, job_id: str, worker_id: str, error: str | None, traceback: str | None
    ) -> JobStatus:
        """The claimed worker ran on_job_complete; write the final status now."""
        with self._write() as conn:
            job = _get_job(conn, job_id)
            if job.completion_state != "claimed" or job.completion_worker != worker_id:
                return job.status
            conn.execute(
                t.jobs.update().where(t.jobs.c.job_id == job_id).values(completion_state="done")
            )
            if error is None:
                _finalize(conn, job)
            else:
                _set_status(
                    conn,
                    job_id,
                    JobStatus.WORKER_ERROR,
                    "batchapi.on_job_complete_failed",
                    f"on_job_complete raised on worker {worker_id}: {error}",
                    traceback,
                )
            return _get_job(conn, job_id).status

    def expire_leases(self) -> int:
        """End the attempt of every batch whose lease ran out: it is queued again, or failed if
        it has used all its attempts (a batch that keeps killing its worker must not loop)."""
        with self._write() as conn:
            rows = conn.execute(
                _leased_rows().where(
                    t.batches.c.state == BatchState.LEASED.value,
                    t.batches.c.lease_expires_at < time.time(),
                )
            ).all()
            for row in rows:
                _end_attempt(
                    conn,
                    row,
                    "lease_expired",
                    "the lease expired: the worker stopped heartbeating (it hung, crashed or "
                    "lost the server)",
                )
            return len(rows)

    def release_worker_leases(
        self, job_id: str, worker_id: str, kind: str = "worker_died", reason: str = ""
    ) -> int:
        """A worker is known dead: end the attempts it held now rather than at lease expiry."""
        with self._write() as conn:
            rows = conn.execute(
                _leased_rows().where(
                    t.batches.c.job_id == job_id,
                    t.batches.c.state == BatchState.LEASED.value,
                    t.batches.c.lease_owner == worker_id,
                )
            ).all()
            for row in rows:
                _end_attempt(conn, row, kind, reason or f"worker {worker_id} died")
            return len(rows)

    def extend_worker_leases(self, job_id: str, worker_id: str, lease_s: float) -> None:
        """Renew a worker's leases without checking the job (used when adopting workers)."""
        with self._write() as conn:
            conn.execute(
                t.batches.update()
                .where(
                    t.batches.c.job_id == job_id,
                    t.batches.c.state == BatchState.LEASED.value,
                    t.batches.c.lease_owner == worker_id,
                )
                .values(lease_expires_at=time.time() + lease_s)
            )

    def count_restart(self, job_id: str, limit: int) -> bool:
        """Take one worker restart from the job's budget; False when it is spent."""
        with self._write() as conn:
            updated = conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id, t.jobs.c.worker_restarts < limit)
                .values(worker_restarts=t.jobs.c.worker_restarts + 1)
            )
            return updated.rowcount == 1

    def batch_counts(self, job_id: str) -> dict[str, int]:
        counts = {state.value: 0 for state in BatchState}
        with self._read() as conn:
            for state, n in conn.execute(
                sa.select(t.batches.c.state, sa.func.count())
                .where(t.batches.c.job_id == job_id)
                .group_by(t.batches.c.state)
            ):
                counts[state] = n
        return counts

    def failed_payloads(self, job_id: str) -> Iterator[str]:
        """The payloads of a job's failed batches, in order, read in pages."""
        last = -1
        while True:
            with self._read() as conn:
                rows = conn.execute(
                    sa.select(t.batches.c.seq, t.batches.c.payload)
                    .where(
                        t.batches.c.job_id == job_id,
                        t.batches.c.state == BatchState.FAILED.value,
                        t.batches.c.seq > last,
                    )
                    .order_by(t.batches.c.seq)
                    .limit(_INSERT_CHUNK)
                ).all()
            if not rows:
                return
            for row in rows:
                yield row.payload
            last = rows[-1].seq

    def failed_batches(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(
                    t.batches.c.batch_id,
                    t.batches.c.seq,
                    t.batches.c.attempts,
                    t.batches.c.error_kind,
                    t.batches.c.error_message,
                    t.batches.c.error_traceback,
                    t.batches.c.payload,
                )
                .where(t.batches.c.job_id == job_id, t.batches.c.state == BatchState.FAILED.value)
                .order_by(t.batches.c.seq)
                .limit(limit)
            ).all()
        return [
            {
                "batch_id": row.batch_id,
                "index": row.seq,
                "attempts": row.attempts,
                "error_kind": row.error_kind,
                "error": row.error_message,
                "traceback": row.error_traceback,
                "payload": json.loads(row.payload),
            }
            for row in rows
        ]


# -- helpers that run inside a caller's transaction ---------------------------------------------


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _worker_record(r: Any) -> WorkerRecord:
    return WorkerRecord(
        worker_id=r.worker_id,
        job_id=r.job_id,
        state=WorkerState(r.state),
        pid=r.pid,
        exit_code=r.exit_code,
        error_message=r.error_message,
        started_at=r.started_at,
        updated_at=r.updated_at,
    )


def _api_record(row: Any) -> ApiRecord:
    return ApiRecord(
        name=row.name,
        spec_id=row.spec_id,
        spec=json.loads(row.spec_json),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _get_job(conn: Connection, job_id: str) -> Job:
    row = conn.execute(sa.select(t.jobs).where(t.jobs.c.job_id == job_id)).first()
    if row is None:
        raise errors.NotFound(f"job {job_id} does not exist")
    return Job.from_row(row)


def _set_status(
    conn: Connection,
    job_id: str,
    new: JobStatus,
    error_kind: str | None = None,
    error_message: str | None = None,
    error_traceback: str | None = None,
) -> bool:
    job = _get_job(conn, job_id)
    if not can_transition(job.status, new):
        return False
    values: dict[str, Any] = {"status": new.value}
    if new.terminal:
        values["end_time"] = time.time()
    if error_kind is not None:
        values.update(
            error_kind=error_kind, error_message=error_message, error_traceback=error_traceback
        )
    # Compare-and-set on the status we read, so two writers cannot both win.
    updated = conn.execute(
        t.jobs.update()
        .where(t.jobs.c.job_id == job_id, t.jobs.c.status == job.status.value)
        .values(**values)
    )
    if updated.rowcount != 1:
        return False
    if new.terminal:
        # No batch stays leased once a job has ended; results that arrive later are ignored.
        conn.execute(
            t.batches.update()
            .where(t.batches.c.job_id == job_id, t.batches.c.state == BatchState.LEASED.value)
            .values(state=BatchState.QUEUED.value, lease_owner=None, lease_expires_at=None)
        )
    return True


def _record_result(conn: Connection, job: Job, worker_id: str, result: BatchResult) -> None:
    """Apply one batch result, if the batch is still leased to this worker.

    A result from a worker whose lease expired (and whose batch went to someone else) is
    dropped, so every batch is counted once.
    """
    where = sa.and_(
        t.batches.c.batch_id == result.batch_id,
        t.batches.c.job_id == job.job_id,
        t.batches.c.state == BatchState.LEASED.value,
        t.batches.c.lease_owner == worker_id,
    )
    if result.ok:
        updated = conn.execute(
            t.batches.update()
            .where(where)
            .values(
                state=BatchState.SUCCEEDED.value,
                lease_owner=None,
                lease_expires_at=None,
                duration_s=result.duration_s,
            )
        )
        if updated.rowcount == 1:
            conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job.job_id)
                .values(
                    succeeded=t.jobs.c.succeeded + 1,
                    succeeded_time_s=t.jobs.c.succeeded_time_s + result.duration_s,
                )
            )
        return
    row = conn.execute(
        _leased_rows().where(
            t.batches.c.batch_id == result.batch_id,
            t.batches.c.job_id == job.job_id,
            t.batches.c.state == BatchState.LEASED.value,
            t.batches.c.lease_owner == worker_id,
        )
    ).first()
    if row is not None:
        _end_attempt(conn, row, "predict_error", result.error, result.traceback, result.duration_s)


def _leased_rows() -> sa.Select[Any]:
    """Batch rows with what `_end_attempt` needs to know."""
    return sa.select(
        t.batches.c.job_id, t.batches.c.seq, t.batches.c.attempts, t.jobs.c.max_attempts
    ).join(t.jobs, t.jobs.c.job_id == t.batches.c.job_id)


def _end_attempt(
    conn: Connection,
    row: Any,
    kind: str,
    message: str | None,
    traceback: str | None = None,
    duration_s: float | None = None,
) -> None:
    """A leased batch's attempt failed: queue it again, or fail it on its last attempt.

    Attempts are counted when a batch is leased, so a batch that kills its worker uses them up
    like one that raises, and ends `failed` with the reason instead of looping forever.
    """
    final = row.attempts >= row.max_attempts
    updated = conn.execute(
        t.batches.update()
        .where(
            t.batches.c.job_id == row.job_id,
            t.batches.c.seq == row.seq,
            t.batches.c.state == BatchState.LEASED.value,
        )
        .values(
            state=(BatchState.FAILED if final else BatchState.QUEUED).value,
            lease_owner=None,
            lease_expires_at=None,
            duration_s=duration_s,
            error_kind=kind,
            error_message=message,
            error_traceback=traceback,
        )
    )
    if final and updated.rowcount == 1:
        conn.execute(
            t.jobs.update().where(t.jobs.c.job_id == row.job_id).values(failed=t.jobs.c.failed + 1)
        )


def _maybe_complete(conn: Connection, job_id: str, worker_id: str) -> LeaseResult:
    """Nothing to lease: decide whether the job is complete, and who runs the hook."""
    job = _get_job(conn, job_id)
    if job.status.terminal:
        return LeaseResult(batches=[], done=True)
    if not job.enqueue_done:
        return LeaseResult(batches=[])
    active = conn.execute(
        sa.select(t.batches.c.seq)
        .where(t.batches.c.job_id == job_id, t.batches.c.state.in_(_ACTIVE))
        .limit(1)
    ).first()
    if active is not None:
        # Other workers still hold batches; one may fail and come back, so stay.
        return LeaseResult(batches=[])
    if job.completion_state is not None:
        return LeaseResult(batches=[], done=job.completion_worker != worker_id)
    if job.has_hook is None:
        return LeaseResult(batches=[])  # no worker has loaded the predictor yet
    if job.has_hook:
        # The compare-and-set on completion_state makes this worker the only one to run it.
        claimed = conn.execute(
            t.jobs.update()
            .where(t.jobs.c.job_id == job_id, t.jobs.c.completion_state.is_(None))
            .values(completion_state="claimed", completion_worker=worker_id)
        )
        if claimed.rowcount == 1:
            return LeaseResult(batches=[], run_hook=True)
        return LeaseResult(batches=[], done=True)
    conn.execute(
        t.jobs.update()
        .where(t.jobs.c.job_id == job_id)
        .values(completion_state="done", completion_worker=worker_id)
    )
    return LeaseResult(batches=[], done=True, final_status=_finalize(conn, job))


def _finalize(conn: Connection, job: Job) -> JobStatus:
    current = _get_job(conn, job.job_id)
    status = JobStatus.SUCCEEDED if current.failed == 0 else JobStatus.COMPLETED_WITH_FAILURES
    _set_status(conn, job.job_id, status)
    return status
