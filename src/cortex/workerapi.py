"""The worker API's work: a worker's token, its spec, its state reports, leases, heartbeats,
log shipments and its hook report (the HTTP routes are `cortex.api.worker`)."""

from __future__ import annotations

import hmac
from typing import Any

from cortex import errors, launch, spec, views
from cortex.jobs import JobStatus, WorkerState
from cortex.lifecycle import Lifecycle
from cortex.outputs import Outputs
from cortex.settings import Settings
from cortex.store import LeaseResult, Store
from cortex.store.records import BatchResult
from cortex.store.tokens import WorkerJob


class WorkerApi:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        lifecycle: Lifecycle,
        preparation: launch.Preparation,
        outputs: Outputs,
    ) -> None:
        self.outputs = outputs
        self.settings = settings
        self.store = store
        self.lifecycle = lifecycle
        self.preparation = preparation

    def authorize_worker(self, job_id: str, token: str, *, read: bool = True) -> WorkerJob | None:
        """The job a worker token belongs to; the token is compared in constant time. Its
        token is read once, then kept in memory (`cortex.store.tokens`); without `read`, None
        unless it is there already."""
        job = self.store.worker_job(job_id) if read else self.store.worker_jobs.get(job_id)
        if job is None and not read:
            return None
        if job is None:
            # Same answer as a wrong token: a worker token reveals nothing about other jobs.
            raise errors.Forbidden("this token is not valid for that job")
        if not hmac.compare_digest(job.worker_token.encode(), token.encode()):
            raise errors.Forbidden("this token is not valid for that job")
        return job

    def worker_spec(self, worker_job: WorkerJob) -> dict[str, Any]:
        # The job as it is now: its batch count grows while it is being enqueued.
        job = self.store.get_job(worker_job.job_id)
        if job is None:
            raise errors.JobMissing(worker_job.job_id)
        api_spec = self.lifecycle.api_spec_for(job)
        parsed = spec.APISpec.model_validate(api_spec)
        ready = self.preparation.ready(job.spec_id, parsed)
        job_spec = views.job_spec_json(job, api_spec)
        if job.status is JobStatus.ENQUEUING and job.dataset and "batches" in job.dataset:
            # An item list whose batches are being written while its workers start (faster
            # than a commit, forked): their predictors get the final count, as in Cortex,
            # where workers start once every batch is enqueued.
            job_spec["total_batch_count"] = job.dataset["batches"]
        return {
            "job_spec": job_spec,
            "api_spec": api_spec,
            # The models to load: where the server fetched them, or in the project folder.
            "models": ready.models
            if ready is not None
            else [m.model_dump() for m in parsed.predictor.model_list()],
            "config": spec.deep_merge(api_spec["predictor"]["config"], job.config),
            "heartbeat_s": self.settings.heartbeat_s,
            "lease_s": self.settings.lease_s,
        }

    def worker_state(
        self,
        job: WorkerJob,
        worker_id: str,
        state: WorkerState,
        *,
        seq: int | None = None,
        pid: int | None = None,
        has_hook: bool | None = None,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        reason = self.store.report_state(
            job.job_id,
            worker_id,
            state,
            seq=seq,
            pid=pid,
            has_hook=has_hook,
            error=error,
            traceback=traceback,
        )
        if reason is not None:  # this report failed the job
            self.lifecycle.ended(job.job_id, JobStatus.WORKER_ERROR, reason)
        elif state is WorkerState.RUNNING:
            self.lifecycle.wake()  # its predictor loads: the job may have more workers now

    def draining(self, worker_id: str) -> bool:
        """Whether the worker was asked to finish its current batch and exit."""
        return self.store.worker_draining(worker_id)

    def lease(
        self,
        job: WorkerJob,
        worker_id: str,
        results: list[BatchResult],
        max_batches: int,
        seq: int | None = None,
        hold: bool = False,
        leaving: bool = False,
    ) -> LeaseResult:
        # (No per-lease log line: at thousands of leases a second it would drown the log.)
        max_batches = max(0, min(max_batches, self.settings.max_lease_batches))
        result = self.store.lease(
            job.job_id,
            worker_id,
            results,
            max_batches,
            self.settings.lease_s,
            seq,
            hold=hold and not max_batches,
            leaving=leaving,
        )
        if result.write_output:
            self.outputs.start(job.job_id)
        if result.final_status is not None:
            self.lifecycle.ended(job.job_id, result.final_status, None)
        elif result.done:
            self.lifecycle.wake()
        return result

    def stored_payload(self, job: WorkerJob, batch_id: str) -> bytes:
        """A batch's payload as stored (a JSON array, or a reference to lines in files)."""
        stored = self.store.stored_payload(job.job_id, batch_id)
        if stored is None:
            raise errors.NotFound(f"batch {batch_id} of job {job.job_id} has no stored payload")
        return stored

    def summary(self, job: WorkerJob) -> dict[str, Any]:
        """What `on_job_complete(job_summary)` is told: the counts (`succeeded`, `failed`,
        `not_run`, `total`), `job_id`, `api_name`, `start_time` (RFC 3339), `output` (where
        the results were written, or null), `any_failed`, and the `status` the job ends with
        if the hook succeeds."""
        summary = self.store.summary(job.job_id) or {"job_id": job.job_id}
        summary["start_time"] = views.rfc3339(summary.get("start_time"))
        failed = bool(summary.get("any_failed"))
        summary["status"] = (
            JobStatus.COMPLETED_WITH_FAILURES if failed else JobStatus.SUCCEEDED
        ).value
        return summary

    def heartbeat(self, job: WorkerJob, worker_id: str) -> bool:
        return self.store.heartbeat(job.job_id, worker_id, self.settings.lease_s)

    def ship_logs(
        self,
        job: WorkerJob,
        worker_id: str,
        lines: list[list[Any]],
        dropped: int = 0,
        seq: int | None = None,
    ) -> int:
        """Store a worker's log shipment (once, however often it is sent), within the job's
        log budget."""
        return self.store.ship_logs(
            job.job_id, worker_id, lines, dropped, seq, self.settings.log_max_bytes
        )

    def finish_hook(
        self,
        job: WorkerJob,
        worker_id: str,
        error: str | None,
        traceback: str | None,
        seq: int | None = None,
    ) -> JobStatus:
        result = self.store.finish_hook(job.job_id, worker_id, error, traceback, seq)
        if result.taken:  # said once, not again for a copy of the report
            outcome = "finished" if error is None else f"failed: {error}"
            self.lifecycle.job_event(job.job_id, f"on_job_complete {outcome} (worker {worker_id})")
        if result.ended:
            message = None if error is None else f"on_job_complete: {error}"
            self.lifecycle.ended(job.job_id, result.status, message)
        return result.status
