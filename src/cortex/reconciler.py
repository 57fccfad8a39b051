"""The reconciler: acts on worker exits, expired leases, timeouts and ended jobs.

It runs on a short tick and is woken at once by status changes, so a stop or a failure takes
effect in well under a second rather than on a minute-long cron.
"""

from __future__ import annotations

import logging
import threading
import time

from cortex.jobs import JobStatus, WorkerState
from cortex.launchers import WorkerExit
from cortex.service import Service

log = logging.getLogger("cortex.server")

# Workers of a job that completed normally exit by themselves, once they have shipped the log
# lines they still hold (up to 30 s); they are only signalled if still there after this.
_NATURAL_EXIT_GRACE_S = 40.0
_NATURAL_END = (JobStatus.SUCCEEDED, JobStatus.COMPLETED_WITH_FAILURES)
_PRUNE_EVERY_S = 60.0


class Reconciler:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._stopping: set[str] = set()
        self._next_prune = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cortex-reconciler", daemon=True)
        service.wake = self._wake.set

    def start(self) -> None:
        self.recover()
        self._thread.start()

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.settings.reconcile_s)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # one bad tick must not end reconciling
                log.exception("reconcile tick failed")

    def tick(self) -> None:
        store = self.service.store
        for ended in self.service.launcher.poll():
            self._on_exit(ended)
        store.expire_leases()
        now = time.time()
        for job in store.in_progress_jobs():
            if job.timeout_s is not None and now >= job.start_time + job.timeout_s:
                self.service._end(
                    job.job_id,
                    JobStatus.TIMED_OUT,
                    "batchapi.timed_out",
                    f"terminating job after exceeding the specified timeout of {job.timeout_s} "
                    "seconds",
                )
        for job_id in self.service.launcher.job_ids():
            owner = store.get_job(job_id)
            if owner is None or not owner.status.terminal:
                continue
            ended_at = owner.end_time or now
            if owner.status in _NATURAL_END and now - ended_at < _NATURAL_EXIT_GRACE_S:
                continue
            self._stop_async(job_id)
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY_S
            pruned = self.service.logs.prune(
                now - self.settings.log_retention_s, self.settings.log_max_lines_per_job
            )
            if pruned:
                log.info("pruned %d log chunks past the retention settings", pruned)

    def _on_exit(self, ended: WorkerExit) -> None:
        store = self.service.store
        # First, so that a follower who sees the worker ended has every line it wrote.
        self.service.ingest_output(ended.job_id, ended.worker_id)
        worker = store.get_worker(ended.worker_id)
        if ended.exit_code == 0:
            store.update_worker(ended.worker_id, WorkerState.SUCCEEDED, exit_code=0)
            return
        if ended.exit_code is None:
            # An adopted worker (started by an earlier server) is gone and its exit code
            # cannot be known: do not blame the job, make sure someone finishes it.
            store.update_worker(ended.worker_id, WorkerState.UNKNOWN, error_message=ended.reason)
        else:
            store.update_worker(
                ended.worker_id,
                WorkerState.FAILED,
                exit_code=ended.exit_code,
                error_message=f"worker {ended.reason}",
            )
        job = store.get_job(ended.job_id)
        if job is None or not job.status.in_progress:
            return
        reason = f"worker {ended.worker_id} {ended.reason}"
        if job.completion_state == "claimed" and job.completion_worker == ended.worker_id:
            # The hook may have half run; running it again could repeat its side effects.
            self.service._end(
                job.job_id,
                JobStatus.WORKER_OOM if ended.oom else JobStatus.WORKER_ERROR,
                "batchapi.hook_worker_died",
                f"{reason} while running on_job_complete",
            )
            return
        kind = "worker_oom" if ended.oom else "worker_died"
        store.release_worker_leases(job.job_id, ended.worker_id, kind, reason)
        if ended.oom:
            self.service._end(job.job_id, JobStatus.WORKER_OOM, "batchapi.worker_oom", reason)
            return
        if worker is not None and worker.state in (WorkerState.PENDING, WorkerState.INITIALIZING):
            # It died before its predictor was loaded: another worker would most likely too.
            self.service._end(
                job.job_id,
                JobStatus.WORKER_ERROR,
                "batchapi.worker_exited",
                f"{reason} before the predictor was loaded (see the worker's log)",
            )
            return
        # A running worker died (killed, crashed): its batches were given back above; start a
        # replacement, within a budget so that a job whose workers keep dying still ends.
        budget = max(3, job.workers * job.max_attempts)
        if store.count_restart(job.job_id, budget):
            self.service.job_event(job.job_id, f"{reason}; starting a replacement", "WARNING")
            self.service.launch_workers(job, 1)
        else:
            self.service._end(
                job.job_id,
                JobStatus.WORKER_ERROR,
                "batchapi.worker_exited",
                f"{reason}; {budget} workers were already replaced, giving up",
            )

    def _stop_async(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._stopping:
                return
            self._stopping.add(job_id)

        def stop() -> None:
            try:
                self.service.launcher.stop_job(job_id, self.settings.worker_grace_s)
            finally:
                with self._lock:
                    self._stopping.discard(job_id)
                self._wake.set()

        threading.Thread(target=stop, name=f"cortex-stop-{job_id}", daemon=True).start()

    def recover(self) -> None:
        """At start-up: adopt the workers an earlier server started, and start new workers for
        a running job that lost all of its workers while no server was running."""
        store = self.service.store
        for job in store.in_progress_jobs():
            alive = set()
            for worker in store.list_workers(job.job_id):
                if not worker.state.alive:
                    continue
                if worker.pid is not None and self.service.launcher.adopt(
                    job.job_id, worker.worker_id, worker.pid
                ):
                    alive.add(worker.worker_id)
                    # Heartbeats failed while the server was down: the worker still holds its
                    # batches, so its leases must not expire on the first tick.
                    store.extend_worker_leases(job.job_id, worker.worker_id, self.settings.lease_s)
                    continue
                store.update_worker(
                    worker.worker_id,
                    WorkerState.UNKNOWN,
                    error_message="the worker was gone when the server started",
                )
                store.release_worker_leases(
                    job.job_id,
                    worker.worker_id,
                    "worker_died",
                    "the worker died while the server was down",
                )
            if job.completion_state == "claimed" and job.completion_worker not in alive:
                # As when a hook's worker dies under a running server: no second run.
                self.service._end(
                    job.job_id,
                    JobStatus.WORKER_ERROR,
                    "batchapi.hook_worker_died",
                    f"worker {job.completion_worker} died while running on_job_complete",
                )
                continue
            if not alive and job.status is JobStatus.RUNNING:
                self.service.job_event(
                    job.job_id, "no live workers after a restart; starting new ones"
                )
                self.service.launch_workers(job, job.workers)
