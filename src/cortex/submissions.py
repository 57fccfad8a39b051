"""Submissions: the three ways a job is created (an item list, a file dataset, the failed
batches of another job), and the threads that enqueue file datasets."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
from collections.abc import Iterator
from typing import Any

from cortex import datasets, enqueuer, errors, hookspec, jobspec, outputs, spec
from cortex.jobs import JobStatus, new_job_id
from cortex.lifecycle import Lifecycle
from cortex.pool import Pool
from cortex.settings import Settings
from cortex.store import ApiRecord, Job, Store, engine
from cortex.store.submissions import NO_EXTRAS, Extras

log = logging.getLogger("cortex.server")

# Batches per transaction when an item list is written: it is in memory already, and fewer
# commits interleave less with the leases of workers that started meanwhile (W4: 0.48 s with
# chunks of 1000, 0.35 s with 5000).
_ITEM_CHUNK_BATCHES = 5000

# The dataset kind of a job whose items came inline (an item list) while they are written.
ITEM_LIST = "item_list"
# Why such a job failed when its server died before its items were all written.
ENQUEUE_INTERRUPTED = "batchapi.enqueue_interrupted"


class Submissions:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        replica_id: str,
        lifecycle: Lifecycle,
        pool: Pool,
    ) -> None:
        self.settings = settings
        self.store = store
        self.replica_id = replica_id
        self.lifecycle = lifecycle
        self.pool = pool
        # The jobs whose file datasets this replica is enqueuing now, a thread each.
        self._enqueuers: dict[str, threading.Thread] = {}
        self._enqueuers_lock = threading.Lock()

    def submit(
        self, api_name: str, data: Any, dry_run: bool = False, extras: Extras = NO_EXTRAS
    ) -> Job | Iterator[str]:
        """Validate a submission and create its job; with `dry_run`, create nothing and
        return the files it matches (none for an item list), listed as they are read.
        `extras` carries the submission's idempotency key (the rest is filled in here)."""
        submission = jobspec.parse_submission(data)
        self._check_workers(submission.workers)
        if submission.output is not None:
            outputs.check_allowed(submission.output.path, self.settings)
        job_id = new_job_id()
        # An unknown API is reported before the items are checked.
        api = self.lifecycle.get_api(api_name)
        extras = dataclasses.replace(
            extras,
            metadata=submission.metadata,
            webhook=self._webhook(api, submission),
            **_limits(submission, api),
        )
        self._check_fits(api)
        if submission.file_dataset is not None:
            return self._submit_files(job_id, api_name, submission, dry_run, extras)
        return self._submit_items(job_id, api_name, submission, dry_run, extras)

    def _webhook(self, api: ApiRecord, submission: jobspec.Submission) -> dict[str, Any] | None:
        """The job's webhook: the submission's, else the API's default; refused if this
        server cannot sign it or may not send it there."""
        webhook = submission.webhook
        if not submission.webhook_given and api.spec.get("webhook") is not None:
            webhook = hookspec.parse_webhook(api.spec["webhook"], "the API's webhook")
        if webhook is None:
            return None
        if not self.settings.webhook_secret:
            raise errors.InvalidSubmission(
                "webhook: this server has no CORTEX_WEBHOOK_SECRET to sign webhooks with; ask "
                "its operator to set one",
                kind="batchapi.webhook_unsigned",
            )
        hookspec.check_webhook_url(webhook.url, self.settings.webhook_urls)
        return webhook.model_dump()

    def _submit_items(
        self,
        job_id: str,
        api_name: str,
        submission: jobspec.Submission,
        dry_run: bool,
        extras: Extras,
    ) -> Job | Iterator[str]:
        """An item list: every batch is built (and every item checked) first, then the job is
        stored and its workers started, and the batches are written while the workers boot,
        in chunks they lease from as each commits. The answer comes once all are written: a
        job id, once returned, names durable batches.

        Until then the job is `status_enqueuing`, owned by this replica, with the dataset kind
        `item_list`; the items live only in this request, so if the server dies before the
        last chunk, the reconciler fails the job (`_enqueue`) instead of resuming it."""
        assert submission.item_list is not None
        item_list = submission.item_list
        payloads = list(jobspec.item_batches(item_list.items, item_list.batch_size))
        if dry_run:
            return iter(())
        # This thread is the job's enqueuer from before its row exists: the reconciler, which
        # resumes enqueuing jobs nobody writes, must not start another.
        with self._enqueuers_lock:
            self._enqueuers[job_id] = threading.current_thread()
        try:
            # The number of batches is known before any is written: a predictor's job_spec
            # has it final while they are (`workerapi`), as the spec has it.
            dataset = {"kind": ITEM_LIST, "batches": len(payloads)}
            job = self._create_enqueuing(job_id, api_name, submission, dataset, extras)
            self.lifecycle.job_event(
                job_id,
                f"partitioning {len(item_list.items)} items found in job submission into "
                f"{len(payloads)} batches of size {item_list.batch_size}",
            )
            # Its workers start while the batches are written (on a tight pool one, and more
            # once the predictor has loaded: `scheduling`, rule 2).
            self.pool.schedule_now({job_id: len(payloads)})
            return self._write_items(job, payloads, len(item_list.items), item_list.batch_size)
        finally:
            with self._enqueuers_lock:
                self._enqueuers.pop(job_id, None)

    def _create_enqueuing(
        self,
        job_id: str,
        api_name: str,
        submission: jobspec.Submission,
        dataset: dict[str, Any],
        extras: Extras,
    ) -> Job:
        """Store a submission's job as enqueuing, owned by this replica."""
        return self.store.create_enqueuing_job(
            job_id=job_id,
            api_name=api_name,
            workers=submission.workers,
            config=submission.config,
            timeout_s=submission.timeout,
            max_attempts=submission.max_attempts,
            worker_token=secrets.token_urlsafe(32),
            dataset=dataset,
            replica_id=self.replica_id,
            extras=extras,
            priority=submission.priority,
            min_workers=submission.min_workers,
        )

    def _write_items(self, job: Job, payloads: list[str], items: int, batch_size: int) -> Job:
        try:
            done = enqueuer.write(
                self.store,
                job.job_id,
                self.replica_id,
                # (payload, items): every batch is full but the last.
                (
                    (payload, min(batch_size, items - i * batch_size))
                    for i, payload in enumerate(payloads)
                ),
                on_chunk=lambda _: None,
                chunk_batches=_ITEM_CHUNK_BATCHES,
            )
        except Exception as err:
            log.exception("job %s: cannot write its batches", job.job_id)
            self.lifecycle.end_job(
                job.job_id,
                JobStatus.UNEXPECTED_ERROR,
                "batchapi.enqueue_failed",
                f"failed to write the job's batches: {engine.error_reason(err)}",
            )
            raise
        if done is None:  # stopped (or timed out) meanwhile
            return self.store.get_job(job.job_id) or job
        self.pool.request()
        self.lifecycle.wake()  # workers may be waiting only for enqueue_done
        return done

    def _submit_files(
        self,
        job_id: str,
        api_name: str,
        submission: jobspec.Submission,
        dry_run: bool,
        extras: Extras,
    ) -> Job | Iterator[str]:
        """A file dataset: list until one file matches (else 400), store the job as
        enqueuing, and enqueue it on a thread of its own; the answer does not wait."""
        dataset = submission.file_dataset
        assert dataset is not None
        datasets.check_remote(dataset.paths, self.settings.data_urls)
        files = datasets.list_files(dataset, self.settings.resolved_data_roots)
        try:
            first = next(files, None)
        except datasets.StorageError:
            files.close()
            if dry_run:
                raise
            # Storage unreachable or refusing: whether anything matches cannot be known here.
            # The job is accepted, and its enqueuer fails it with the storage's own reason.
            first = ""
        if first is None:
            raise errors.InvalidSubmission(
                "no s3 files match search criteria", kind="batchapi.no_s3_files_found"
            )
        if dry_run:
            return itertools.chain([first], files)
        files.close()
        kind = submission.dataset_kind
        job = self._create_enqueuing(
            job_id, api_name, submission, {"kind": kind, **dataset.to_json()}, extras
        )
        self.lifecycle.job_event(job.job_id, "started enqueuing batches")
        self.start_enqueuing(job.job_id)
        return job

    # -- enqueuing file datasets ------------------------------------------------------------

    def start_enqueuing(self, job_id: str) -> None:
        """Enqueue (or resume enqueuing) a job's file dataset on a thread, unless this replica
        does already."""
        with self._enqueuers_lock:
            if job_id in self._enqueuers:
                return
            thread = threading.Thread(
                target=self._enqueue, args=(job_id,), name=f"cortex-enqueue-{job_id}", daemon=True
            )
            self._enqueuers[job_id] = thread
        thread.start()

    def enqueuing(self, job_id: str) -> bool:
        with self._enqueuers_lock:
            return job_id in self._enqueuers

    def _enqueue(self, job_id: str) -> None:
        try:
            job = self.store.get_job(job_id)
            if job is None or job.enqueue_owner != self.replica_id or job.enqueue_done:
                return
            if job.dataset is not None and job.dataset.get("kind") == ITEM_LIST:
                # Its items were in the request of a server that died while writing them.
                self.lifecycle.end_job(
                    job_id,
                    JobStatus.ENQUEUE_FAILED,
                    ENQUEUE_INTERRUPTED,
                    "the server stopped while writing this job's batches; its items were sent "
                    "inline and are not kept: submit the job again",
                )
                return
            if job.enqueued_items:
                self.lifecycle.job_event(
                    job_id,
                    f"resuming enqueuing after {job.total_batch_count} batches "
                    f"({job.enqueued_items} items) already written",
                )
            files = [0]

            def on_file(url: str) -> None:
                files[0] += 1
                # Each file is named, as in the spec, up to a point: 100,000 small files must
                # not make 100,000 log lines.
                if files[0] <= 1000 or files[0] % 1000 == 0:
                    self.lifecycle.job_event(job_id, f"enqueuing contents from file {url}")

            launched = [False]

            def on_chunk(written: Job) -> None:
                self.lifecycle.job_event(job_id, f"enqueued {written.total_batch_count} batches")
                if not launched[0]:
                    launched[0] = True
                    self.pool.schedule_now()  # the first worker, at once
                else:
                    self.pool.request()  # more batches: maybe more workers

            done = enqueuer.run(
                self.store,
                job,
                self.settings.resolved_data_roots,
                self.replica_id,
                on_chunk=on_chunk,
                on_file=on_file,
            )
            if done is None:
                return  # stopped, timed out, deleted or taken over meanwhile
            if done.status is JobStatus.RUNNING:
                self.lifecycle.job_event(
                    job_id, f"completed enqueuing a total of {done.total_batch_count} batches"
                )
                self.pool.request()
                self.lifecycle.wake()  # workers may be waiting only for enqueue_done
            else:
                self.lifecycle.ended(job_id, done.status, done.error_message)
        except datasets.DatasetError as err:
            self.lifecycle.end_job(
                job_id,
                JobStatus.ENQUEUE_FAILED,
                err.kind,
                f"failed to enqueue all batches: {err.message}",
            )
        except Exception as err:
            log.exception("job %s: enqueuing failed", job_id)
            self.lifecycle.end_job(
                job_id,
                JobStatus.ENQUEUE_FAILED,
                "batchapi.enqueue_failed",
                f"failed to enqueue all batches: {engine.error_reason(err)}",
            )
        finally:
            with self._enqueuers_lock:
                self._enqueuers.pop(job_id, None)

    def _check_workers(self, workers: int) -> None:
        if workers > self.settings.max_workers:
            raise errors.InvalidSubmission(
                f"workers: {workers} is more than this server allows per job "
                f"({self.settings.max_workers}; set CORTEX_MAX_WORKERS to change it)",
                kind="batchapi.too_many_workers",
            )

    def _check_fits(self, api: ApiRecord) -> None:
        """Refuse a job one worker of which could never fit in the pool (GPUs or more than
        the whole capacity of a server that cannot grow). A job that fits but finds the pool
        busy is accepted: its workers wait as pending."""
        self.pool.check_fits(spec.APISpec.model_validate(api.spec).compute)

    def retry_failed(self, api_name: str, job_id: str, workers: int | None = None) -> Job:
        """A new job, linked to `job_id` by `retry_of`, that runs only its failed batches.

        The old job's record stays as it was: history is not rewritten, and the new job has
        its own status, counters and hook run.
        """
        old = self.lifecycle.get_job(api_name, job_id)
        if old.status.in_progress:
            raise errors.InvalidSubmission(
                f"job {job_id} is still in progress; retry its failed batches once it ends",
                kind="batchapi.job_is_in_progress",
            )
        if old.failed == 0:
            raise errors.InvalidSubmission(
                f"job {job_id} has no failed batches", kind="batchapi.no_failed_batches"
            )
        workers = workers or old.workers
        self._check_workers(workers)
        new_id = new_job_id()
        self._check_fits(self.lifecycle.get_api(api_name))
        return self._retry(old, new_id, workers)

    def _retry(self, old: Job, new_id: str, workers: int) -> Job:
        job_id = old.job_id
        job = self.store.create_job(
            job_id=new_id,
            api_name=old.api_name,
            workers=workers,
            config=old.config,
            timeout_s=old.timeout_s,
            max_attempts=old.max_attempts,
            worker_token=secrets.token_urlsafe(32),
            payloads=self.store.failed_payloads(job_id),
            replica_id=None,  # its workers are the scheduler's to place
            retry_of=job_id,
            # A retry is found and followed as the job it retries was, and keeps its limits;
            # its results stay in the store (writing them to the old job's output would
            # replace that job's files).
            extras=Extras(
                metadata=old.metadata,
                webhook=old.webhook,
                batch_timeout_s=old.batch_timeout_s,
                max_failed_batches=old.max_failed_batches,
            ),
            priority=old.priority,
            min_workers=old.min_workers,
        )
        self.lifecycle.job_event(
            job.job_id, f"retrying the {job.total_batch_count} failed batches of job {job_id}"
        )
        self.pool.schedule_now()
        return job


def _limits(submission: jobspec.Submission, api: ApiRecord) -> dict[str, Any]:
    """The job's limits and output (`Extras` fields): the submission's, else the API's
    `batch_timeout` from cortex.yaml."""
    return {
        "batch_timeout_s": submission.batch_timeout or api.spec.get("batch_timeout"),
        "max_failed_batches": submission.max_failed_batches,
        "output_path": None if submission.output is None else submission.output.path,
    }
