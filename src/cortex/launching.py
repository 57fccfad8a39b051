"""Starting a job's workers on this replica: once their API version is ready here
(`cortex.launch`), through the launcher; and what they write outside the log capture."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

from cortex import envfiles, launch, modelcache, spec
from cortex.deploys import Deploys
from cortex.jobs import JobStatus, WorkerState
from cortex.launchers import Launcher, WorkerLaunch
from cortex.lifecycle import Lifecycle
from cortex.settings import Settings
from cortex.store import Job, Store
from cortex.store.logs import LogStore

log = logging.getLogger("cortex.server")


class Launching:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        launcher: Launcher,
        logs: LogStore,
        replica_id: str,
        lifecycle: Lifecycle,
        deploys: Deploys,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.logs = logs
        # The workers this replica starts are its own to watch (see `cortex.replicas`).
        self.replica_id = replica_id
        self.lifecycle = lifecycle
        self.deploys = deploys
        self.models = modelcache.ModelCache(
            settings.data_dir / "models", settings.resolved_data_roots, settings.data_urls
        )
        self.preparation = launch.Preparation(
            deploys.environments, self.models, deploys.env_definition, deploys.project_dir
        )

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

    def start_workers(self, job: Job, worker_ids: list[str]) -> None:
        """Start the processes of workers whose rows this replica owns; if the job's
        environment is not built on this machine yet, once it is (they stay pending)."""
        api_spec = spec.APISpec.model_validate(self.lifecycle.api_spec_for(job))
        project_dir = self.deploys.project_dir(job.spec_id)
        ready = self.preparation.ready(job.spec_id, api_spec)
        if ready is None:
            self._start_when_prepared(job, worker_ids, api_spec)
            return
        env_dir = ready.env_dir
        env_key, env_extra = self.deploys.env_definition(job.spec_id)
        python_path = [str(project_dir)]
        if api_spec.predictor.python_path:
            python_path.insert(0, str(project_dir / api_spec.predictor.python_path))
        # The project's .env, then the API's predictor.env, which wins.
        user_env = {**self.deploys.dotenv(job.spec_id, project_dir), **api_spec.predictor.env}
        runtime = None if env_dir is None else envfiles.runtime_dir(self.deploys.environments.root)
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
                self._never_started(worker_ids, f"cannot start worker {worker_id}: {err}")
                self.lifecycle.end_job(
                    job.job_id,
                    JobStatus.UNEXPECTED_ERROR,
                    "batchapi.launch_failed",
                    f"cannot start worker {worker_id}: {err}",
                )
                return
            if pid is not None:
                self.store.update_worker(worker_id, WorkerState.PENDING, pid=pid)
        started = len(worker_ids)
        self.lifecycle.job_event(
            job.job_id, f"started {started} worker{'s' if started != 1 else ''}"
        )

    def _never_started(self, worker_ids: list[str], reason: str) -> None:
        """End the rows of workers whose processes will not be started (those started
        already keep theirs: their exits end them), giving their capacity back."""
        for worker_id in worker_ids:
            worker = self.store.get_worker(worker_id)
            if worker is not None and worker.pid is None:
                self.store.end_worker(worker_id, WorkerState.FAILED, error_message=reason)

    def _start_when_prepared(self, job: Job, worker_ids: list[str], api_spec: spec.APISpec) -> None:
        """The workers stay pending while the job's environment builds (a job submitted
        during a deploy's build waits for it) and its models download; the job fails if
        either does."""

        def done(outcome: launch.Ready | launch.Failure) -> None:
            current = self.store.get_job(job.job_id)
            if current is None or not current.status.in_progress:
                # Their rows hold capacity until they end.
                self._never_started(worker_ids, "the job ended before the worker started")
                return
            if isinstance(outcome, launch.Ready):
                self.start_workers(current, worker_ids)
                return
            self._never_started(worker_ids, outcome.message)
            self.lifecycle.end_job(
                job.job_id, JobStatus.WORKER_ERROR, outcome.kind, outcome.message
            )

        self.preparation.prepare(
            job.spec_id, api_spec, functools.partial(self.lifecycle.job_event, job.job_id), done
        )
