"""The JSON the public API answers with (spec §4), built from store records."""

from __future__ import annotations

import datetime
from typing import Any

from cortex import spec
from cortex.store import ApiRecord, Job, WorkerRecord


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_spec_json(job: Job, api_spec: dict[str, Any]) -> dict[str, Any]:
    """The spec's Job object, plus our additive fields (`timeout`, `max_attempts`,
    `batch_timeout`, `max_failed_batches`, `output`)."""
    return {
        "job_id": job.job_id,
        "api_name": job.api_name,
        "workers": job.workers,
        "config": job.config,
        "api_id": job.spec_id,
        "spec_id": job.spec_id,
        "predictor_id": spec.digest(spec.canonical_json(api_spec["predictor"]))[:32],
        "sqs_url": None,
        "total_batch_count": job.total_batch_count,
        "start_time": rfc3339(job.start_time),
        "timeout": job.timeout_s,
        "sqs_dead_letter_queue": None,
        "max_attempts": job.max_attempts,
        "retry_of": job.retry_of,
        # Additive: seconds one predict may run (null: no limit), the failure budget (null:
        # none), and where the results go: {"path"}, with "files" and "errors" once written.
        "batch_timeout": job.batch_timeout_s,
        "max_failed_batches": job.max_failed_batches,
        "output": job.output,
        # Additive: the submission's metadata ({} if none); the predictor's job_spec has it.
        "metadata": job.metadata or {},
        # Additive: scheduling (docs/design.md, "Scheduling").
        "priority": job.priority,
        "min_workers": job.min_workers,
    }


def job_status_json(
    job: Job,
    api_spec: dict[str, Any],
    *,
    batch_counts: dict[str, int],
    worker_counts: dict[str, int] | None,
    deliveries: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    average = job.succeeded_time_s / job.succeeded if job.succeeded else None
    if worker_counts is not None and job.pending_workers:
        # Pending: workers placed whose processes have not started, and workers the job
        # wants that do not fit in the pool yet.
        worker_counts = {
            **worker_counts,
            "pending": worker_counts.get("pending", 0) + job.pending_workers,
        }
    status: dict[str, Any] = {
        **job_spec_json(job, api_spec),
        "status": job.status.value,
        "end_time": rfc3339(job.end_time),
        "batches_in_queue": batch_counts["queued"] + batch_counts["leased"]
        if job.status.in_progress
        else 0,
        # Additive: every batch by state (queued, leased, succeeded, failed).
        "batch_counts": batch_counts,
        "batch_metrics": {
            "succeeded": job.succeeded,
            "failed": job.failed,
            "average_time_per_batch": average,
        },
        "worker_counts": worker_counts,
        # Additive: why workers of the job are pending, if some wait for capacity.
        "pending_reason": job.pending_reason if job.status.in_progress else None,
        # Additive: the dataset as submitted: its kind, and a file dataset's paths, globs and
        # batch size (an item list's items are not kept).
        "dataset": job.dataset,
        # Additive: why a job failed, as data (kind, message, traceback).
        "error": None
        if job.error_kind is None
        else {
            "kind": job.error_kind,
            "message": job.error_message,
            "traceback": job.error_traceback,
        },
        # Additive: the job's webhook (null if none; not in the predictor's job_spec: its URL
        # may hold the submitter's secret) and each of its deliveries, oldest first.
        "webhook": job.webhook,
        "webhook_deliveries": [delivery_json(d) for d in deliveries or []],
    }
    return status


def delivery_json(row: dict[str, Any]) -> dict[str, Any]:
    """One webhook delivery: `state` is pending (being retried), delivered (a 2xx answer) or
    failed (given up); `last_status` is the receiver's last HTTP status (null if it could not
    be reached, `last_error` says why)."""
    state = "pending"
    if row["delivered_at"] is not None:
        state = "delivered"
    elif row["gave_up_at"] is not None:
        state = "failed"
    return {
        "delivery_id": row["delivery_id"],
        "event": row["event"],
        "state": state,
        "attempts": row["attempts"],
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "last_attempt_at": rfc3339(row["last_attempt_at"]),
        "next_attempt_at": rfc3339(row["next_attempt_at"]) if state == "pending" else None,
        "delivered_at": rfc3339(row["delivered_at"]),
    }


def status_json(
    progress: tuple[Job, dict[str, int], dict[str, int] | None],
    api_spec: dict[str, Any],
    base_url: str,
    deliveries: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """What `GET /<api>/<job_id>` answers: the job's status, its API's spec, its address."""
    job, batch_counts, worker_counts = progress
    return {
        "job_status": job_status_json(
            job,
            api_spec,
            batch_counts=batch_counts,
            worker_counts=worker_counts,
            deliveries=deliveries,
        ),
        "api_spec": api_spec,
        "endpoint": f"{base_url}/{job.api_name}/{job.job_id}",
    }


def api_json(api: ApiRecord, base_url: str) -> dict[str, Any]:
    return {
        "spec": api.spec,
        "spec_id": api.spec_id,
        "created_at": rfc3339(api.created_at),
        "updated_at": rfc3339(api.updated_at),
        "endpoint": f"{base_url}/{api.name}",
    }


def worker_json(worker: WorkerRecord) -> dict[str, Any]:
    """One worker of a job (additive: `GET /<api>/<job_id>/workers`), as the dashboard lists it."""
    return {
        "worker_id": worker.worker_id,
        # The name the logs give it: worker-0, worker-1, ...
        "name": "worker-" + worker.worker_id.removeprefix(f"{worker.job_id}-"),
        "state": worker.state.value,
        "pid": worker.pid,
        "exit_code": worker.exit_code,
        "error": worker.error_message,
        "replica_id": worker.replica_id,
        # Asked to finish its current batch and exit (preempted, or no longer needed).
        "draining": worker.draining,
        "started_at": rfc3339(worker.started_at),
        "updated_at": rfc3339(worker.updated_at),
        "last_seen": rfc3339(worker.seen_at),
    }
