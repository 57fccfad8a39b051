"""Frozen records the store hands out. Wire shapes live in `cortex.api.schemas`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cortex.jobs import JobStatus, WorkerState


@dataclasses.dataclass(frozen=True)
class ApiRecord:
    name: str
    spec_id: str  # the version that serves
    spec: dict[str, Any]
    created_at: float
    updated_at: float
    # The version being built (see `tables.apis`), and why its build failed if it did.
    pending_spec_id: str | None = None
    pending_error: str | None = None

    @property
    def latest_spec_id(self) -> str:
        """The version deployed last, built or not."""
        return self.pending_spec_id or self.spec_id


@dataclasses.dataclass(frozen=True)
class Job:
    job_id: str
    api_name: str
    spec_id: str
    status: JobStatus
    workers: int
    config: dict[str, Any] | None
    timeout_s: int | None
    max_attempts: int
    start_time: float
    end_time: float | None
    total_batch_count: int
    succeeded: int
    failed: int
    succeeded_time_s: float
    enqueue_done: bool
    has_hook: bool | None
    completion_state: str | None
    completion_worker: str | None
    error_kind: str | None
    error_message: str | None
    error_traceback: str | None
    worker_token: str
    retry_of: str | None = None
    worker_restarts: int = 0
    dataset: dict[str, Any] | None = None
    enqueued_items: int = 0
    enqueue_owner: str | None = None
    metadata: dict[str, str] | None = None
    # {"url": ..., "events": [...]}: where the job's status changes are sent.
    webhook: dict[str, Any] | None = None
    batch_timeout_s: int | None = None
    max_failed_batches: int | None = None
    # {"path"} as submitted, with "files" and "errors" once the results are written there.
    output: dict[str, Any] | None = None
    priority: int = 0
    min_workers: int = 0
    # Workers it wants and cannot have yet, and why (the scheduler's last pass).
    pending_workers: int = 0
    pending_reason: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        m = row._mapping
        return cls(
            job_id=m["job_id"],
            api_name=m["api_name"],
            spec_id=m["spec_id"],
            status=JobStatus(m["status"]),
            workers=m["workers"],
            config=None if m["config_json"] is None else json.loads(m["config_json"]),
            timeout_s=m["timeout_s"],
            max_attempts=m["max_attempts"],
            start_time=m["start_time"],
            end_time=m["end_time"],
            total_batch_count=m["total_batch_count"],
            succeeded=m["succeeded"],
            failed=m["failed"],
            succeeded_time_s=m["succeeded_time_s"],
            enqueue_done=bool(m["enqueue_done"]),
            has_hook=None if m["has_hook"] is None else bool(m["has_hook"]),
            completion_state=m["completion_state"],
            completion_worker=m["completion_worker"],
            error_kind=m["error_kind"],
            error_message=m["error_message"],
            error_traceback=m["error_traceback"],
            worker_token=m["worker_token"],
            retry_of=m["retry_of"],
            worker_restarts=m["worker_restarts"],
            dataset=None if m["dataset_json"] is None else json.loads(m["dataset_json"]),
            enqueued_items=m["enqueued_items"],
            enqueue_owner=m["enqueue_owner"],
            metadata=_json_or_none(m["metadata_json"]),
            webhook=_json_or_none(m["webhook_json"]),
            batch_timeout_s=m["batch_timeout_s"],
            max_failed_batches=m["max_failed_batches"],
            output=None if m["output_json"] is None else json.loads(m["output_json"]),
            priority=m["priority"],
            min_workers=m["min_workers"],
            pending_workers=m["pending_workers"],
            pending_reason=m["pending_reason"],
        )


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclasses.dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    job_id: str
    state: WorkerState
    pid: int | None
    exit_code: int | None
    error_message: str | None
    started_at: float
    updated_at: float
    replica_id: str | None = None
    seen_at: float | None = None
    draining: bool = False


@dataclasses.dataclass(frozen=True)
class LeasedBatch:
    batch_id: str
    payload: bytes  # the batch's JSON array, as stored (UTF-8): spliced into answers as is
    attempt: int
    seq: int = 0  # its place in the job (what a kept lease answer names it by)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """What a worker reports for one leased batch."""

    batch_id: str
    ok: bool
    duration_s: float
    error: str | None = None
    traceback: str | None = None
    # Why the attempt failed: predict_error, batch_timeout, result_too_large,
    # result_not_serialisable.
    error_kind: str = "predict_error"
    # What `predict` returned, as the batch's JSON lines (`cortex.results`); None: nothing.
    lines: str | None = None


@dataclasses.dataclass(frozen=True)
class LeaseResult:
    batches: list[LeasedBatch]
    # The worker holding this lease must run on_job_complete and report back.
    run_hook: bool = False
    # Nothing is left for this worker: the job ended, or every batch has ended.
    done: bool = False
    # Set when this very request ended the job (no hook to run): its final status.
    final_status: JobStatus | None = None
    # This request ended the job's last batch and its results must be written to its output
    # location before it completes (`cortex.outputs`).
    write_output: bool = False


@dataclasses.dataclass(frozen=True)
class HookResult:
    """What the report of an `on_job_complete` run did."""

    status: JobStatus  # the job's status after it
    # The report was taken: it came from the worker that holds the claim, and it was not a
    # copy of a report taken already.
    taken: bool = False
    # And it ended the job (a stop may have come first).
    ended: bool = False
