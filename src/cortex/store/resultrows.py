"""Collected results: reading a job's results and its failed batches back in pages, and the
step of a job's completion that writes them to its output location (`cortex.outputs`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from cortex.jobs import BatchState, JobStatus
from cortex.store import batchrows, budget, engine, jobrows
from cortex.store import tables as t
from cortex.store.records import Job

# Batches read a transaction: a page holds at most this many results (each at most the
# worker's limit, `cortex.worker.results.MAX_RESULT_BYTES`) and is written out before the next.
_PAGE_BATCHES = 16
_ERROR_PAGE = 200
_UNDONE = [BatchState.FAILED, BatchState.NOT_RUN]


class ResultStore(engine.BaseStore):
    """`Store`'s collected results and the output step of completion."""

    def result_pages(self, job_id: str) -> Iterator[str]:
        """The job's results as JSON lines, batch by batch in the job's order, a few batches
        a read: what one holds in memory stays bounded whatever the job's size."""
        last = -1
        while True:
            with self.read() as conn:
                rows = conn.execute(
                    sa.select(t.batch_results.c.seq, t.batch_results.c.lines)
                    .where(t.batch_results.c.job_id == job_id, t.batch_results.c.seq > last)
                    .order_by(t.batch_results.c.seq)
                    .limit(_PAGE_BATCHES)
                ).all()
            if not rows:
                return
            yield "".join(row.lines for row in rows)
            last = rows[-1].seq

    def error_pages(self, job_id: str) -> Iterator[list[dict[str, Any]]]:
        """The job's failed batches (and those it did not run), as `failed_batches` lists
        them, in pages in the job's order."""
        last = -1
        while True:
            with self.read() as conn:
                page = batchrows.failed_records(conn, job_id, _UNDONE, _ERROR_PAGE, last)
            if not page:
                return
            yield page
            last = page[-1]["index"]

    def writing_outputs(self) -> list[Job]:
        """In-progress jobs whose results are being written to their output location."""
        with self.read() as conn:
            rows = conn.execute(
                sa.select(t.jobs).where(
                    t.jobs.c.status == JobStatus.RUNNING.value,
                    t.jobs.c.completion_state == "writing",
                )
            ).all()
        return [Job.from_row(row) for row in rows]

    def finish_output(self, job_id: str, output: dict[str, Any]) -> JobStatus | None:
        """The results are written: name the files on the job, and complete it. A job with
        a hook waits for a worker to claim it ("written"); any other gets its final status
        here, which is returned (None if it did not end here)."""
        with self.write() as conn:
            job = jobrows.lock(conn, job_id, missing_ok=True)
            if job is None or job.completion_state != "writing" or not job.status.in_progress:
                return None
            hookless = budget.spent(job) or not job.has_hook
            conn.execute(
                t.jobs.update()
                .where(t.jobs.c.job_id == job_id)
                .values(
                    output_json=json.dumps(output),
                    completion_state="done" if hookless else "written",
                )
            )
            if not hookless:
                return None
            return jobrows.finalize(conn, job)

    def summary(self, job_id: str) -> dict[str, Any] | None:
        """What `on_job_complete(job_summary)` is told: the counts and where the results are."""
        with self.read() as conn:
            row = conn.execute(sa.select(t.jobs).where(t.jobs.c.job_id == job_id)).first()
            if row is None:
                return None
            job = Job.from_row(row)
            not_run = conn.execute(
                sa.select(sa.func.count())
                .select_from(t.batches)
                .where(t.batches.c.job_id == job_id, t.batches.c.state == BatchState.NOT_RUN.value)
            ).scalar_one()
        return {
            "job_id": job.job_id,
            "api_name": job.api_name,
            "start_time": job.start_time,
            "total": job.total_batch_count,
            "succeeded": job.succeeded,
            "failed": job.failed,
            "not_run": int(not_run),
            "any_failed": job.failed > 0,
            "output": job.output,
        }
