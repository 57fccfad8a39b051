"""Worker tokens kept in memory (`store.tokens`): read once, bounded, read again after their
time to live, and never put back by a read that a deletion overtook."""

from __future__ import annotations

import functools
from collections.abc import Callable

from cortex.store.tokens import WorkerJob, WorkerJobs


def _job(n: int) -> WorkerJob:
    return WorkerJob(f"job{n}", "api", f"token{n}")


def test_a_job_is_read_once_and_a_missing_one_every_time() -> None:
    jobs = WorkerJobs()
    reads: list[str] = []

    def read(job_id: str, found: WorkerJob | None) -> Callable[[], WorkerJob | None]:
        def inner() -> WorkerJob | None:
            reads.append(job_id)
            return found

        return inner

    assert jobs.load("job1", read("job1", _job(1))) == _job(1)
    assert jobs.load("job1", read("job1", _job(1))) == _job(1)
    assert jobs.load("nope", read("nope", None)) is None
    assert jobs.load("nope", read("nope", None)) is None
    assert reads == ["job1", "nope", "nope"]


def test_the_least_recently_used_go_first() -> None:
    jobs = WorkerJobs(max_jobs=2)
    for n in (1, 2):
        jobs.load(f"job{n}", functools.partial(_job, n))
    assert jobs.get("job1") == _job(1)  # job2 is now the least recently used
    jobs.load("job3", lambda: _job(3))
    assert jobs.get("job2") is None
    assert jobs.get("job1") == _job(1) and jobs.get("job3") == _job(3)


def test_an_old_entry_is_read_again() -> None:
    jobs = WorkerJobs(ttl_s=0.0)
    jobs.load("job1", lambda: _job(1))
    assert jobs.get("job1") is None


def test_a_deletion_during_a_read_is_not_undone() -> None:
    jobs = WorkerJobs()

    def read_then_deleted() -> WorkerJob:
        jobs.forget(["job1"])  # the job's deletion commits while it is being read
        return _job(1)

    assert jobs.load("job1", read_then_deleted) == _job(1)
    assert jobs.get("job1") is None
    jobs.load("job1", lambda: _job(1))
    jobs.forget(["job1"])
    assert jobs.get("job1") is None
