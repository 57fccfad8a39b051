"""The one place that coordinates the store, the launcher and the worker API."""

from __future__ import annotations

import contextlib
import functools
import hmac
import itertools
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cortex import (
    datasets,
    enqueuer,
    environments,
    errors,
    launch,
    modelcache,
    project,
    spec,
    views,
)
from cortex.jobs import JobStatus, WorkerState, new_job_id, new_worker_id
from cortex.launchers import Launcher, WorkerLaunch
from cortex.settings import Settings
from cortex.store import ApiRecord, Job, LeaseResult, Store, engine
from cortex.store.logs import LogStore
from cortex.store.records import BatchResult

log = logging.getLogger("cortex.server")

# Batches per transaction when an item list is written: it is in memory already, and fewer
# commits interleave less with the leases of workers that started meanwhile (W4: 0.48 s with
# chunks of 1000, 0.35 s with 5000).
_ITEM_CHUNK_BATCHES = 5000

# The dataset kind of a job whose items came inline (an item list) while they are written.
ITEM_LIST = "item_list"


class Service:
    def __init__(
        self, settings: Settings, store: Store, launcher: Launcher, replica_id: str
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.logs = LogStore(store, settings.log_max_bytes)
        # The workers this replica starts are its own to watch (see `cortex.replicas`).
        self.replica_id = replica_id
        self._specs: dict[str, dict[str, Any]] = {}
        # Set by the reconciler so that a status change acts at once, not on the next tick.
        self.wake: Any = lambda: None
        # The jobs whose file datasets this replica is enqueuing now, a thread each.
        self._enqueuers: dict[str, threading.Thread] = {}
        self._enqueuers_lock = threading.Lock()
        self.environments = environments.Environments(
            settings.data_dir / "envs",
            settings.data_dir / "cache",
            budget_bytes=settings.env_cache_bytes,
            build_timeout_s=settings.env_build_timeout_s,
            installer=settings.env_installer,
        )
        # A version's environment (key, extra requirements) and .env, read once from its
        # (immutable) project.
        self._env_definitions: dict[str, tuple[str | None, tuple[str, ...]]] = {}
        self.projects = project.Projects(settings.data_dir / "projects", settings.max_project_bytes)
        self._dotenvs: dict[str, dict[str, str]] = {}
        self.models = modelcache.ModelCache(
            settings.data_dir / "models", settings.resolved_data_roots, settings.data_urls
        )
        self.preparation = launch.Preparation(
            self.environments, self.models, self.env_definition, self.project_dir
        )

    # -- APIs -------------------------------------------------------------------------------

    def deploy(self, spec_data: Any, archive: bytes) -> tuple[str, str, dict[str, Any]]:
        """Validate and store an API, and start building its environment if it needs one that
        is not built; returns (result as `put_api` gives it, name, the environment's state).

        A version whose environment is not built is the API's pending version until it is:
        the version that served goes on serving new jobs only if the build fails."""
        api = spec.parse_api_spec(spec_data)
        names = project.archive_names(archive, self.settings.max_project_bytes)
        if api.predictor.path not in names:
            raise errors.InvalidSpec(
                f"api {api.name!r}: predictor.path: {api.predictor.path} is not in the project "
                "folder (or is excluded by .cortexignore)"
            )
        for path in spec.missing_model_files(api, names):
            raise errors.InvalidSpec(
                f"api {api.name!r}: predictor: the model {path} is not a file or folder in the "
                "project (or is excluded by .cortexignore)"
            )
        spec_json = api.to_json()
        spec_id = spec.digest(spec.canonical_json(spec_json), archive)[:32]
        # Unpacked and not yet stored: a prune of unused folders must leave it alone.
        with self.projects.deploying(spec_id) as project_dir:
            unpacked = project_dir.is_dir()
            self.projects.extract(spec_id, archive)
            try:
                environments.check_project(project_dir)
            except errors.CortexError:
                if not unpacked:  # a refused deploy leaves nothing behind
                    shutil.rmtree(project_dir, ignore_errors=True)
                raise
            key, extra = self.env_definition(spec_id, api)
            status = self.environments.status(key)
            cached = status.state in (environments.READY, environments.NONE)
            result = self.store.put_api(api.name, spec_id, spec_json, archive, pending=not cached)
        if not cached:
            assert key is not None
            status = self.environments.build(
                key, project_dir, lambda done: self._built(api.name, spec_id, done), extra=extra
            )
            log.info("api %s: building environment %s", api.name, key)
        return result, api.name, {"spec_id": spec_id, "cached": cached, **status.to_json()}

    def _built(self, name: str, spec_id: str, status: environments.Status) -> None:
        """A deploy's build ended: the version serves, or the one before it goes on serving."""
        if status.state not in (environments.READY, environments.FAILED):
            return
        error = None if status.state == environments.READY else (status.message or "failed")
        try:
            if self.store.finish_build(name, spec_id, error):
                log.info(
                    "api %s: version %s %s",
                    name,
                    spec_id,
                    "serves"
                    if error is None
                    else f"failed to build; the previous version goes on serving: {error[:300]}",
                )
            self.prune_environments()
        except Exception:
            log.exception("api %s: cannot record the end of its environment build", name)

    def resume_builds(self) -> None:
        """At start-up: builds that a stopped server left unfinished start again."""
        for api in self.store.list_apis():
            if api.pending_spec_id is None or api.pending_error is not None:
                continue
            key, extra = self.env_definition(api.pending_spec_id)
            if key is None:
                continue
            self.environments.build(
                key,
                self.project_dir(api.pending_spec_id),
                functools.partial(self._built, api.name, api.pending_spec_id),
                extra=extra,
            )

    def env_definition(
        self, spec_id: str, api: spec.APISpec | None = None
    ) -> tuple[str | None, tuple[str, ...]]:
        """A version's environment: its key (None: the server's interpreter runs it) and the
        requirements the server adds to the project's (the model runtime of its type)."""
        if spec_id not in self._env_definitions:
            if api is None:
                api = spec.APISpec.model_validate(self.store.get_spec_json(spec_id))
            project_dir = self.project_dir(spec_id)
            extra = environments.runtime_requirements(
                api.predictor.type, api.compute.gpu, project_dir
            )
            self._env_definitions[spec_id] = (environments.key_for(project_dir, extra), extra)
        return self._env_definitions[spec_id]

    def env_key(self, spec_id: str) -> str | None:
        return self.env_definition(spec_id)[0]

    def api_environment(self, api: ApiRecord) -> dict[str, Any]:
        """The environment of the API's latest deploy: building, ready, failed (with the
        installer's message) or none (the server's interpreter runs it).

        A pending version is `building` until its outcome is in the store, not merely on disk:
        who sees `ready` or `failed` sees the version that serves new jobs already chosen."""
        spec_id = api.latest_spec_id
        key = self.env_key(spec_id)
        if api.pending_error is not None:
            status = environments.Status(key, environments.FAILED, api.pending_error)
        elif api.pending_spec_id is not None:
            status = environments.Status(key, environments.BUILDING)
        else:
            status = self.environments.status(key)
        return {"spec_id": spec_id, **status.to_json()}

    def prune_environments(self) -> list[str]:
        in_use = {self.env_key(spec_id) for spec_id in self.store.spec_ids_in_use()}
        return self.environments.prune({key for key in in_use if key is not None})

    def get_api(self, name: str) -> ApiRecord:
        api = self.store.get_api(name)
        if api is None:
            raise errors.ApiNotDeployed(name)
        return api

    def list_apis(self) -> list[ApiRecord]:
        return self.store.list_apis()

    def delete_api(self, name: str) -> None:
        self.get_api(name)
        for job in self.store.list_jobs(name, limit=1_000_000):
            if job.status.in_progress:
                self._end(job.job_id, JobStatus.STOPPED)
        for job_id in self.launcher.job_ids():
            other = self.store.get_job(job_id)
            if other is not None and other.api_name == name:
                self.launcher.stop_job(job_id, self.settings.worker_grace_s)
        self.store.delete_api(name)
        log.info("deleted api %s", name)
        self.prune_projects()  # its code, at once: it may be big

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, api_name: str, data: Any, dry_run: bool = False) -> Job | Iterator[str]:
        """Validate a submission and create its job; with `dry_run`, create nothing and
        return the files it matches (none for an item list), listed as they are read."""
        submission = spec.parse_submission(data)
        self._check_workers(submission.workers)
        job_id = new_job_id()
        # An unknown API is reported before the items are checked.
        with self._reserved(self.get_api(api_name), job_id, submission.workers, dry_run):
            if submission.file_dataset is not None:
                return self._submit_files(job_id, api_name, submission, dry_run)
            return self._submit_items(job_id, api_name, submission, dry_run)

    def _submit_items(
        self, job_id: str, api_name: str, submission: spec.Submission, dry_run: bool
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
        payloads = list(spec.item_batches(item_list.items, item_list.batch_size))
        if dry_run:
            return iter(())
        # This thread is the job's enqueuer from before its row exists: the reconciler, which
        # resumes enqueuing jobs nobody writes, must not start another.
        with self._enqueuers_lock:
            self._enqueuers[job_id] = threading.current_thread()
        try:
            job = self._create_enqueuing(job_id, api_name, submission, {"kind": ITEM_LIST})
            self.job_event(
                job_id,
                f"partitioning {len(item_list.items)} items found in job submission into "
                f"{len(payloads)} batches of size {item_list.batch_size}",
            )
            self.launch_workers(job, job.workers)
            return self._write_items(job, payloads, len(item_list.items), item_list.batch_size)
        finally:
            with self._enqueuers_lock:
                self._enqueuers.pop(job_id, None)

    def _create_enqueuing(
        self, job_id: str, api_name: str, submission: spec.Submission, dataset: dict[str, Any]
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
            self._end(
                job.job_id,
                JobStatus.UNEXPECTED_ERROR,
                "batchapi.enqueue_failed",
                f"failed to write the job's batches: {engine.error_reason(err)}",
            )
            raise
        if done is None:  # stopped (or timed out) meanwhile
            return self.store.get_job(job.job_id) or job
        self.wake()  # workers may be waiting only for enqueue_done
        return done

    def _submit_files(
        self, job_id: str, api_name: str, submission: spec.Submission, dry_run: bool
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
            job_id, api_name, submission, {"kind": kind, **dataset.to_json()}
        )
        self.job_event(job.job_id, "started enqueuing batches")
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
                self._end(
                    job_id,
                    JobStatus.ENQUEUE_FAILED,
                    "batchapi.enqueue_interrupted",
                    "the server stopped while writing this job's batches; its items were sent "
                    "inline and are not kept: submit the job again",
                )
                return
            if job.enqueued_items:
                self.job_event(
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
                    self.job_event(job_id, f"enqueuing contents from file {url}")

            launched = [False]

            def on_chunk(written: Job) -> None:
                self.job_event(job_id, f"enqueued {written.total_batch_count} batches")
                if not launched[0]:
                    launched[0] = True
                    self._ensure_workers(written)

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
                self.job_event(
                    job_id, f"completed enqueuing a total of {done.total_batch_count} batches"
                )
                self._ensure_workers(done)
                self.wake()  # workers may be waiting only for enqueue_done
            else:
                self._ended(job_id, done.status, done.error_message)
        except datasets.DatasetError as err:
            self._end(
                job_id,
                JobStatus.ENQUEUE_FAILED,
                err.kind,
                f"failed to enqueue all batches: {err.message}",
            )
        except Exception as err:
            log.exception("job %s: enqueuing failed", job_id)
            self._end(
                job_id,
                JobStatus.ENQUEUE_FAILED,
                "batchapi.enqueue_failed",
                f"failed to enqueue all batches: {engine.error_reason(err)}",
            )
        finally:
            with self._enqueuers_lock:
                self._enqueuers.pop(job_id, None)

    def _ensure_workers(self, job: Job) -> None:
        """Start the job's workers unless some are alive (a resumed enqueuing may find the
        ones it started before)."""
        if not any(w.state.alive for w in self.store.list_workers(job.job_id)):
            self.launch_workers(job, job.workers)

    def _check_workers(self, workers: int) -> None:
        if workers > self.settings.max_workers:
            raise errors.InvalidSubmission(
                f"workers: {workers} is more than this server allows per job "
                f"({self.settings.max_workers}; set CORTEX_MAX_WORKERS to change it)",
                kind="batchapi.too_many_workers",
            )

    @contextlib.contextmanager
    def _reserved(
        self, api: ApiRecord, job_id: str, workers: int, dry_run: bool = False
    ) -> Iterator[None]:
        """Refuse a job that the launcher cannot place now (GPUs on the local launcher), or
        hold what its workers will take while it is created. What they do not take is given
        back when the job ends; everything, if it is not created (or only a dry run)."""
        compute = spec.APISpec.model_validate(api.spec).compute
        self.launcher.reserve(job_id, compute, workers)
        try:
            yield
        except BaseException:
            self.launcher.unreserve(job_id)
            raise
        if dry_run:
            self.launcher.unreserve(job_id)

    def retry_failed(self, api_name: str, job_id: str, workers: int | None = None) -> Job:
        """A new job, linked to `job_id` by `retry_of`, that runs only its failed batches.

        The old job's record stays as it was: history is not rewritten, and the new job has
        its own status, counters and hook run.
        """
        old = self.get_job(api_name, job_id)
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
        with self._reserved(self.get_api(api_name), new_id, workers):
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
            replica_id=self.replica_id,
            retry_of=job_id,
        )
        self.job_event(
            job.job_id, f"retrying the {job.total_batch_count} failed batches of job {job_id}"
        )
        self.start_workers(job, [new_worker_id(job.job_id, i) for i in range(job.workers)])
        return job

    def get_job(self, api_name: str, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is not None and job.api_name == api_name:
            return job  # its API exists: deleting an API deletes its jobs
        self.get_api(api_name)  # not deployed: that is the error to report
        raise errors.JobNotFound(api_name, job_id)

    def list_jobs(self, api_name: str, limit: int = 100) -> list[Job]:
        self.get_api(api_name)
        return self.store.list_jobs(api_name, limit)

    def stop_job(self, api_name: str, job_id: str) -> None:
        job = self.get_job(api_name, job_id)
        if not job.status.in_progress or not self._end(job_id, JobStatus.STOPPED):
            raise errors.JobNotInProgress()
        self.job_event(job_id, "request received to stop job; performing cleanup...")

    def _end(
        self,
        job_id: str,
        status: JobStatus,
        kind: str | None = None,
        message: str | None = None,
        trace: str | None = None,
    ) -> bool:
        ended = self.store.set_status(
            job_id, status, error_kind=kind, error_message=message, error_traceback=trace
        )
        if ended:
            self._ended(job_id, status, message)
        return ended

    def _ended(self, job_id: str, status: JobStatus, message: str | None) -> None:
        """Say that a job reached its final status, and let the reconciler act on it."""
        self.launcher.unreserve(job_id)  # what its workers were promised and did not take
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

    # -- launching --------------------------------------------------------------------------

    def project_dir(self, spec_id: str) -> Path:
        dest = self.projects.path(spec_id)
        if dest.is_dir():
            return dest
        _, archive = self.store.get_spec(spec_id)
        return self.projects.extract(spec_id, archive)

    def prune_projects(self) -> list[str]:
        """Remove the unpacked projects of versions that nothing uses any more: no API serves
        or builds them, no in-progress job runs them, and no environment build reads them (a
        build is shared by every version with the same environment files, and reads the
        folder of the version that started it, which a later deploy may have replaced)."""

        def in_use() -> set[str]:
            building = {
                spec_id
                for spec_id, (key, _) in list(self._env_definitions.items())
                if key is not None and self.environments.status(key).state == environments.BUILDING
            }
            return self.store.spec_ids_in_use() | building

        return self.projects.prune(in_use)

    def _dotenv(self, spec_id: str, project_dir: Path) -> dict[str, str]:
        if spec_id not in self._dotenvs:
            path = project_dir / environments.DOTENV
            text = path.read_text(errors="replace") if path.is_file() else ""
            self._dotenvs[spec_id] = environments.read_dotenv(text)
        return self._dotenvs[spec_id]

    def worker_output_path(self, job_id: str, worker_id: str) -> Path:
        """Where a local worker's raw stdout and stderr go (what bypasses the log capture)."""
        return self.settings.data_dir.resolve() / "logs" / job_id / f"{worker_id}.log"

    def ingest_output(self, job_id: str, worker_id: str, max_bytes: int = 256 << 10) -> int:
        """Store what a worker wrote outside the log capture (an import error before Python
        was up, a segfault, a C library writing to its file descriptors): read once, when it
        exits, keeping the last `max_bytes`; the file goes then (its lines are in the store)."""
        path = self.worker_output_path(job_id, worker_id)
        try:
            with open(path, "rb") as raw:
                raw.seek(0, os.SEEK_END)
                size = raw.tell()
                raw.seek(max(0, size - max_bytes))
                data = raw.read()
        except OSError:
            return 0
        text = data.decode("utf-8", errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        if size > max_bytes and lines:
            lines[0] = f"[... {size - max_bytes} earlier bytes not kept]"
        now = time.time()
        # Not budgeted: at most `max_bytes` a worker, and often why the job failed.
        self.logs.append(
            job_id,
            worker_id,
            [[now, "output", None, None, line] for line in lines],
            budgeted=False,
        )
        # (The job's folder stays for its other workers; the reconciler removes it once the
        # job is gone from the store.)
        with contextlib.suppress(OSError):
            path.unlink()
        return len(lines)

    def launch_workers(self, job: Job, count: int) -> None:
        """Start `count` more workers for a job, on this replica."""
        self.start_workers(job, self.store.add_workers(job.job_id, count, self.replica_id))

    def start_workers(self, job: Job, worker_ids: list[str]) -> None:
        """Start the processes of workers whose rows this replica owns; if the job's
        environment is not built on this machine yet, once it is (they stay pending)."""
        api_spec = spec.APISpec.model_validate(self.api_spec_for(job))
        project_dir = self.project_dir(job.spec_id)
        ready = self.preparation.ready(job.spec_id, api_spec)
        if ready is None:
            self._start_when_prepared(job, worker_ids, api_spec)
            return
        env_dir = ready.env_dir
        env_key, env_extra = self.env_definition(job.spec_id)
        python_path = [str(project_dir)]
        if api_spec.predictor.python_path:
            python_path.insert(0, str(project_dir / api_spec.predictor.python_path))
        # The project's .env, then the API's predictor.env, which wins.
        user_env = {**self._dotenv(job.spec_id, project_dir), **api_spec.predictor.env}
        runtime = None if env_dir is None else environments.runtime_dir(self.environments.root)
        for worker_id in worker_ids:
            env = {
                **user_env,
                "CORTEX_URL": self.settings.resolved_public_url,
                "CORTEX_API_NAME": job.api_name,
                "CORTEX_JOB_ID": job.job_id,
                "CORTEX_WORKER_ID": worker_id,
                "CORTEX_WORKER_TOKEN": job.worker_token,
                "CORTEX_PROJECT_DIR": str(project_dir),
                "PYTHONPATH": ":".join(python_path),
            }
            log_path = self.worker_output_path(job.job_id, worker_id)
            try:
                pid = self.launcher.start(
                    WorkerLaunch(
                        job_id=job.job_id,
                        worker_id=worker_id,
                        project_dir=project_dir,
                        log_path=log_path,
                        compute=api_spec.compute,
                        env=env,
                        env_dir=env_dir,
                        runtime_dir=runtime,
                        env_key=env_key,
                        env_extra=env_extra,
                    )
                )
            except Exception as err:
                log.exception("job %s: cannot start worker %s", job.job_id, worker_id)
                self.store.update_worker(worker_id, WorkerState.FAILED, error_message=str(err))
                self._end(
                    job.job_id,
                    JobStatus.UNEXPECTED_ERROR,
                    "batchapi.launch_failed",
                    f"cannot start worker {worker_id}: {err}",
                )
                return
            if pid is not None:
                self.store.update_worker(worker_id, WorkerState.PENDING, pid=pid)
        started = len(worker_ids)
        self.job_event(job.job_id, f"started {started} worker{'s' if started != 1 else ''}")

    def _start_when_prepared(self, job: Job, worker_ids: list[str], api_spec: spec.APISpec) -> None:
        """The workers stay pending while the job's environment builds (a job submitted
        during a deploy's build waits for it) and its models download; the job fails if
        either does."""

        def done(outcome: launch.Ready | launch.Failure) -> None:
            current = self.store.get_job(job.job_id)
            if current is None or not current.status.in_progress:
                return
            if isinstance(outcome, launch.Ready):
                self.start_workers(current, worker_ids)
                return
            for worker_id in worker_ids:
                self.store.update_worker(
                    worker_id, WorkerState.FAILED, error_message=outcome.message
                )
            self._end(job.job_id, JobStatus.WORKER_ERROR, outcome.kind, outcome.message)

        self.preparation.prepare(
            job.spec_id, api_spec, functools.partial(self.job_event, job.job_id), done
        )

    # -- the worker API ---------------------------------------------------------------------

    def authorize_worker(self, job_id: str, token: str) -> Job:
        """The job a worker token belongs to; the token is compared in constant time."""
        job = self.store.get_job(job_id)
        if job is None:
            # Same answer as a wrong token: a worker token reveals nothing about other jobs.
            raise errors.Forbidden("this token is not valid for that job")
        if not hmac.compare_digest(job.worker_token.encode(), token.encode()):
            raise errors.Forbidden("this token is not valid for that job")
        return job

    def worker_spec(self, job: Job) -> dict[str, Any]:
        api_spec = self.api_spec_for(job)
        parsed = spec.APISpec.model_validate(api_spec)
        ready = self.preparation.ready(job.spec_id, parsed)
        return {
            "job_spec": views.job_spec_json(job, api_spec),
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
        job: Job,
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
            self._ended(job.job_id, JobStatus.WORKER_ERROR, reason)

    def lease(
        self,
        job: Job,
        worker_id: str,
        results: list[BatchResult],
        max_batches: int,
        seq: int | None = None,
    ) -> LeaseResult:
        # (No per-lease log line: at thousands of leases a second it would drown the log.)
        max_batches = max(0, min(max_batches, self.settings.max_lease_batches))
        result = self.store.lease(
            job.job_id, worker_id, results, max_batches, self.settings.lease_s, seq
        )
        if result.final_status is not None:
            self._ended(job.job_id, result.final_status, None)
        elif result.done:
            self.wake()
        return result

    def heartbeat(self, job: Job, worker_id: str) -> bool:
        return self.store.heartbeat(job.job_id, worker_id, self.settings.lease_s)

    def ship_logs(
        self,
        job: Job,
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
        job: Job,
        worker_id: str,
        error: str | None,
        traceback: str | None,
        seq: int | None = None,
    ) -> JobStatus:
        result = self.store.finish_hook(job.job_id, worker_id, error, traceback, seq)
        if result.taken:  # said once, not again for a copy of the report
            outcome = "finished" if error is None else f"failed: {error}"
            self.job_event(job.job_id, f"on_job_complete {outcome} (worker {worker_id})")
        if result.ended:
            message = None if error is None else f"on_job_complete: {error}"
            self._ended(job.job_id, result.status, message)
        return result.status
