"""Worker tokens kept in memory: every worker request is checked against its job's token, and a
job's token never changes, so the job row is read once rather than on every request (it was
about a tenth of a busy server's time in W1, the overhead benchmark).

A job that is not found is not remembered (it may not exist yet on this replica's reading).
A job deleted through this store is forgotten once its deletion has committed. One deleted by
another server replica is read again after `TTL_S` at most; meanwhile its workers' requests
meet the missing job in the store (`batchapi.job_not_found`), which tells a worker its job is
gone as a refused token does.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable

# Jobs remembered (the least recently used go first), and for how long.
MAX_JOBS = 4096
TTL_S = 30.0


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """What a worker request needs of its job, none of which ever changes."""

    job_id: str
    api_name: str
    worker_token: str


class WorkerJobs:
    """A bounded map of job id to `WorkerJob`, safe across threads."""

    def __init__(self, max_jobs: int = MAX_JOBS, ttl_s: float = TTL_S) -> None:
        self._jobs: collections.OrderedDict[str, tuple[float, WorkerJob]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._max_jobs = max_jobs
        self._ttl_s = ttl_s
        # Moved on by every `forget`: a read that began before a deletion committed does not
        # put back what the deletion forgot.
        self._generation = 0

    def get(self, job_id: str) -> WorkerJob | None:
        """The job if it is remembered and not older than the time to live."""
        with self._lock:
            found = self._jobs.get(job_id)
            if found is None:
                return None
            if time.monotonic() - found[0] > self._ttl_s:
                del self._jobs[job_id]
                return None
            self._jobs.move_to_end(job_id)
            return found[1]

    def load(self, job_id: str, read: Callable[[], WorkerJob | None]) -> WorkerJob | None:
        """The job as remembered, or as `read` finds it (then remembered if found)."""
        job = self.get(job_id)
        if job is not None:
            return job
        generation, read_at = self._generation, time.monotonic()
        job = read()
        if job is None:
            return None
        with self._lock:
            if generation == self._generation:
                self._jobs[job_id] = (read_at, job)
                self._jobs.move_to_end(job_id)
                while len(self._jobs) > self._max_jobs:
                    self._jobs.popitem(last=False)
        return job

    def forget(self, job_ids: Iterable[str]) -> None:
        """Jobs that were deleted (call after the deletion committed)."""
        with self._lock:
            self._generation += 1
            for job_id in job_ids:
                self._jobs.pop(job_id, None)
