"""A job's life after it is created: reading it, stopping it, ending it, and saying so."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cortex import errors
from cortex.jobs import JobStatus
from cortex.store import ApiRecord, Job, Store, stats
from cortex.store.logs import LogStore
from cortex.store.records import WorkerRecord
from cortex.store.sql import JobProgress

log = logging.getLogger("cortex.server")


class Lifecycle:
    def __init__(self, store: Store, logs: LogStore) -> None:
        self.store = store
        self.logs = logs
        self._specs: dict[str, dict[str, Any]] = {}
        # Set by the reconciler (`on_wake`) so that a status change acts at once, not on the
        # next tick.
        self._wake: Callable[[], None] = lambda: None

    def on_wake(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever a job's status changes or its workers may act on something."""
        self._wake = wake

    def wake(self) -> None:
        self._wake()

    # -- reads ------------------------------------------------------------------------------

    def get_api(self, name: str) -> ApiRecord:
        api = self.store.get_api(name)
        if api is None:
            raise errors.ApiNotDeployed(name)
        return api

    def get_job(self, api_name: str, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is not None and job.api_name == api_name:
            return job  # its API exists: deleting an API deletes its jobs
        self.get_api(api_name)  # not deployed: that is the error to report
        raise errors.JobNotFound(api_name, job_id)

    def find_job(self, job_id: str) -> Job | None:
        """A job by id alone, or None if there is none (deleted, with its API)."""
        return self.store.get_job(job_id)

    def list_jobs(
        self, api_name: str, limit: int = 100, metadata: dict[str, str] | None = None
    ) -> list[Job]:
        self.get_api(api_name)
        return self.store.list_jobs(api_name, limit, metadata)

    def webhook_deliveries(self, job: Job) -> list[dict[str, Any]]:
        """The job's webhook deliveries (none if it has no webhook), oldest first."""
        return self.store.job_deliveries(job.job_id) if job.webhook else []

    def job_progress(self, job_id: str) -> JobProgress | None:
        """A job with its batch and worker counts, read together; None if there is none."""
        return self.store.job_progress(job_id)

    def failed_batches(self, job_id: str, limit: int) -> list[dict[str, Any]]:
        return self.store.failed_batches(job_id, limit)

    def workers(self, job_id: str) -> list[WorkerRecord]:
        return self.store.list_workers(job_id)

    def snapshot(self) -> stats.Snapshot:
        """The grouped counts `/metrics` reports."""
        return stats.snapshot(self.store)

    def api_spec_for(self, job: Job) -> dict[str, Any]:
        """The spec a job runs with. A spec id names one immutable version, so it is cached
        (status requests need it every time); callers must not change what they get."""
        spec_json = self._specs.get(job.spec_id)
        if spec_json is None:
            spec_json = self.store.get_spec_json(job.spec_id)
            if len(self._specs) > 256:
                self._specs.clear()
            self._specs[job.spec_id] = spec_json
        return spec_json

    # -- changes ----------------------------------------------------------------------------

    def stop_job(self, api_name: str, job_id: str) -> None:
        job = self.get_job(api_name, job_id)
        if not job.status.in_progress or not self.end_job(job_id, JobStatus.STOPPED):
            raise errors.JobNotInProgress()
        self.job_event(job_id, "request received to stop job; performing cleanup...")

    def end_job(
        self,
        job_id: str,
        status: JobStatus,
        kind: str | None = None,
        message: str | None = None,
        trace: str | None = None,
    ) -> bool:
        """Give an in-progress job its final status (with why, for a failure); False if it
        had ended already (the first terminal status wins)."""
        ended = self.store.set_status(
            job_id, status, error_kind=kind, error_message=message, error_traceback=trace
        )
        if ended:
            self.ended(job_id, status, message)
        return ended

    def ended(self, job_id: str, status: JobStatus, message: str | None) -> None:
        """Say that a job reached its final status (written already, by whoever ended it),
        and let the reconciler act on it."""
        level = "INFO" if status in (JobStatus.SUCCEEDED, JobStatus.STOPPED) else "WARNING"
        suffix = f": {message}" if message else ""
        self.job_event(job_id, f"job status: {status.value}{suffix}", level)
        self.wake()

    def job_event(self, job_id: str, message: str, level: str = "INFO") -> None:
        """A line about a job: in the server's log, and in the job's own log stream."""
        log.log(logging.getLevelName(level), "job %s: %s", job_id, message)
        try:
            self.logs.server_line(job_id, message, level)
        except Exception:  # the job's log is best effort; its status is what matters
            log.exception("job %s: cannot store a log line", job_id)
