"""The reconciler: acts on worker exits, expired leases, timeouts, lost workers, ended jobs.

It runs on a short tick and is woken at once by status changes, so a stop or a failure takes
effect in well under a second rather than on a minute-long cron.

Where several server replicas share a store, each one's reconciler watches the worker processes
that replica started (only its launcher knows them): their exits, and stopping them once their
job has ended. Only the replica holding the leader lease does the store-wide work: lease expiry,
timeouts, and replacing the workers of replicas that are gone.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from cortex import pruning, webhooks
from cortex.jobs import JobStatus, WorkerState
from cortex.launchers import WorkerExit
from cortex.replicas import Membership
from cortex.service import Service
from cortex.store.cluster import Cluster
from cortex.worker import results as worker_results

log = logging.getLogger("cortex.server")

# SQLite's write-ahead log is copied into the database at most this often (`_checkpoint`),
# once the store has had no write for `_CHECKPOINT_QUIET_S`; a store that is never quiet gets
# one every `_CHECKPOINT_BUSY_S`. Not much less often: past `WAL_MAX_BYTES` the writer that
# meets the bound copies the rest itself, holding the write lock (at 10 s, back-to-back 1M-item
# submissions, 16 MB of log each, met it every few seconds).
_CHECKPOINT_EVERY_S = 1.0
# The leader's store-wide sweeps run at most this often (`_store_wide`).
_SWEEP_EVERY_S = 1.0
_CHECKPOINT_QUIET_S = 0.5
_CHECKPOINT_BUSY_S = 2.0
# Workers of a job that completed normally exit by themselves, once they have shipped the log
# lines they still hold (up to 30 s); they are only signalled if still there after this.
_NATURAL_EXIT_GRACE_S = 40.0
_NATURAL_END = (JobStatus.SUCCEEDED, JobStatus.COMPLETED_WITH_FAILURES)
_BEFORE_INIT = (WorkerState.PENDING, WorkerState.INITIALIZING)


@dataclasses.dataclass
class _Death:
    """A worker of an in-progress job that died (or was lost), recorded as ended in the store,
    whose consequences (its batches given back, a replacement, or the job's end) are being
    acted on: kept until that is done, and tried again on each tick if a step fails."""

    job_id: str
    worker_id: str
    reason: str
    oom: bool
    before_init: bool
    counted: bool = False  # a restart of the job's budget was taken for its replacement


class Reconciler:
    def __init__(self, service: Service, membership: Membership) -> None:
        self.service = service
        self.lifecycle = service.lifecycle
        self.settings = service.settings
        self.membership = membership
        self.cluster: Cluster = membership.cluster
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._stopping: set[str] = set()
        # Deaths whose consequences are not all acted on yet, by worker id (see `_Death`).
        self._deaths: dict[str, _Death] = {}
        # Workers whose raw output is stored: an exit seen again after a store error does not
        # store it twice.
        self._output_stored: set[str] = set()
        self._lock = threading.Lock()
        self._leader = False  # as of this tick's renewal
        # The tick's tasks, in order: exits are recorded before the deaths they cause are
        # acted on, and the store-wide work (the leader's) may add deaths too.
        self._tasks: list[tuple[str, Callable[[], None]]] = [
            ("exits", self._record_exits),
            ("store_wide", self._store_wide),
            ("deaths", self._act_on_deaths),
            # After the exits and deaths that free capacity, before the new workers start.
            ("schedule", self.service.pool.tick),
            ("enqueuing", self._resume_enqueuing),
            ("stop_ended", self._stop_ended),
            ("checkpoint", self._checkpoint),
        ]
        self._last_checkpoint = 0.0
        self._last_sweep = 0.0
        self._thread = threading.Thread(target=self._run, name="cortex-reconciler", daemon=True)
        # Pruning has a thread of its own: deleting a big job and giving its space back can
        # take seconds, which must not delay a tick (timeouts, worker exits).
        self._pruner = pruning.Pruner(service, membership, self._stopped)
        # So do webhooks: a receiver may take its time answering.
        self._deliverer = webhooks.Deliverer(service, self._stopped)
        self.lifecycle.on_wake(self._wake_all)
        # The leader also places workers on a period (`cortex.pool`).
        self.service.pool.leads = lambda: self.membership.is_leader

    def start(self) -> None:
        # Registered before recovering, so that no leader takes this replica's workers for
        # lost while it adopts them.
        self.membership.renew()
        self.recover()
        self._thread.start()
        self._pruner.start()
        self._deliverer.start()

    def _wake_all(self) -> None:
        """A job's status changed: act on it, and send the webhook events it wrote."""
        self._wake.set()
        self._deliverer.wake()

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._pruner.join(10)
        self._deliverer.join(10)
        try:
            self.membership.resign()
        except Exception:  # the store may be the reason for the shutdown
            log.exception("could not give up the leader lease; it expires by itself")

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self._wake.wait(self.settings.reconcile_s):
                # Woken by a change (a job, a worker's state, an end): room or need may have
                # changed with it.
                self.service.pool.request()
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # one bad tick must not end reconciling
                log.exception("reconcile tick failed")

    def tick(self) -> None:
        """Renew this replica's registration (and learn whether it leads), then run each task
        in order: one that fails is logged by name, and the others still run."""
        self._leader = self.membership.renew()
        for name, task in self._tasks:
            try:
                task()
            except Exception:
                log.exception("reconcile task %s failed", name)

    def _checkpoint(self) -> None:
        """SQLite's log copied into the database when the store is quiet, at most once a
        second: a tick that a burst of events woke (a job's workers loading, its batches
        written) does not pay for one, and neither does a running job. Copying W3's 44 MB of
        payloads takes 0.1-0.3 s of disk and 30-120 ms of CPU on a 2-core machine: in the
        middle of the job, it competed with the job's own writes and a worker's CPU."""
        now = time.monotonic()
        quiet = now - self.service.store.last_write_at >= _CHECKPOINT_QUIET_S
        every = _CHECKPOINT_EVERY_S if quiet else _CHECKPOINT_BUSY_S
        if now - self._last_checkpoint >= every:
            self._last_checkpoint = now
            self.service.store.checkpoint()

    def _record_exits(self) -> None:
        """Record each exit the launcher hands over, and acknowledge it once recorded: an exit
        that cannot be recorded now (a store error) is handed over again on the next tick."""
        launcher = self.service.launcher
        for ended in launcher.poll():
            try:
                self._on_exit(ended)
            except Exception:
                log.exception(
                    "job %s: cannot record the exit of worker %s yet; trying again",
                    ended.job_id,
                    ended.worker_id,
                )
                continue
            launcher.ack(ended.worker_id)
            self._output_stored.discard(ended.worker_id)

    def _act_on_deaths(self) -> None:
        for worker_id, death in list(self._deaths.items()):
            try:
                self._after_death(death)
            except Exception:
                log.exception(
                    "job %s: cannot act on the end of worker %s yet; trying again",
                    death.job_id,
                    worker_id,
                )
                continue
            del self._deaths[worker_id]

    def _resume_enqueuing(self) -> None:
        """Never leave a job enqueuing with nobody enqueuing it: this replica resumes its own
        (after a restart its threads are gone), and the leader takes over those of replicas
        that are gone. The owner is checked in every write, so two never write one job."""
        unfinished = self.service.store.unfinished_enqueues()
        if not unfinished:
            return
        me = self.service.replica_id
        live: set[str] | None = None
        for job in unfinished:
            if job.enqueue_owner == me:
                self.service.submissions.start_enqueuing(job.job_id)
                continue
            if not self._leader:
                continue
            if live is None:
                live = set(self.cluster.live_replicas(self.membership.lease_s))
            if job.enqueue_owner in live:
                continue
            if self.service.store.take_enqueue(job.job_id, job.enqueue_owner, me):
                self.lifecycle.job_event(
                    job.job_id,
                    f"server replica {job.enqueue_owner} that was enqueuing this job is gone; "
                    f"replica {me} resumes it",
                    "WARNING",
                )
                self.service.submissions.start_enqueuing(job.job_id)

    def _store_wide(self) -> None:
        """The leader's work: what no single replica's processes tell it. Its sweeps look for
        what is late by seconds (expired leases and deadlines, timed-out jobs, lost workers),
        so they run at most once a second (a quarter of the lease period, if that is less),
        not on every woken tick: at 4 ticks a second and more under load they cost W3 about
        15 ms of the server's CPU a tick."""
        if not self._leader:
            return
        now = time.monotonic()
        if now - self._last_sweep < min(_SWEEP_EVERY_S, self.settings.lease_s / 4):
            return
        self._last_sweep = now
        store = self.service.store
        for job_id, worker_id in store.expire_deadlines():
            self._kill_wedged(job_id, worker_id)
        store.expire_leases()
        self.service.outputs.resume()
        now = time.time()
        for job in store.in_progress_jobs():
            if job.timeout_s is not None and now >= job.start_time + job.timeout_s:
                self.lifecycle.end_job(
                    job.job_id,
                    JobStatus.TIMED_OUT,
                    "batchapi.timed_out",
                    f"terminating job after exceeding the specified timeout of {job.timeout_s} "
                    "seconds",
                )
        # A worker whose replica is gone is still working if it reaches another replica (its
        # CORTEX_URL is a load balancer): it heartbeats, and is left alone. One that has not
        # been heard from for a lease period is lost, like a worker that died.
        lost = self.cluster.lost_workers(self.membership.lease_s, self.settings.lease_s)
        for worker in lost:
            reason = (
                f"worker {worker.worker_id} was lost: server replica {worker.replica_id} that "
                "started it is gone, and it has not been heard from for "
                f"{self.settings.lease_s:g} s"
            )
            if not self.cluster.mark_lost(worker.worker_id, reason):
                continue
            log.warning("job %s: %s", worker.job_id, reason)
            # Lost with its replica says nothing about the predictor: always replace it.
            self._deaths[worker.worker_id] = _Death(
                worker.job_id, worker.worker_id, reason, oom=False, before_init=False
            )

    def _kill_wedged(self, job_id: str, worker_id: str) -> None:
        """A worker ran a batch past its deadline without ending it (wedged, in C code that
        holds the interpreter's lock): kill it; its exit is then a death like any other, and
        a replacement takes its place."""
        self.lifecycle.job_event(
            job_id,
            f"worker {worker_id} ran a batch past the job's batch_timeout and did not end it; "
            "killing it",
            "WARNING",
        )
        launcher = self.service.launcher

        def kill() -> None:
            if not launcher.stop_worker(worker_id, 0):
                log.warning("job %s: worker %s is not this replica's to kill", job_id, worker_id)

        threading.Thread(target=kill, name=f"cortex-kill-{worker_id}", daemon=True).start()

    def _stop_ended(self) -> None:
        """Stop this replica's workers of jobs that have ended (or were deleted)."""
        now = time.time()
        for job_id in self.service.launcher.job_ids():
            owner = self.service.store.get_job(job_id)
            if owner is None:  # its API was deleted, on this replica or another
                self._stop_async(job_id)
                continue
            if not owner.status.terminal:
                continue
            ended_at = owner.end_time or now
            natural = owner.status in _NATURAL_END and owner.error_kind is None
            if natural and now - ended_at < _NATURAL_EXIT_GRACE_S:
                continue
            self._stop_async(job_id)

    def _on_exit(self, ended: WorkerExit) -> None:
        """Record a worker's exit: its end in the store (once: the first end of a worker wins),
        and, for a worker that died with work left, a `_Death` to act on."""
        store = self.service.store
        worker_id = ended.worker_id
        if worker_id not in self._output_stored:
            # First, so that a follower who sees the worker ended has every line it wrote.
            self.service.launching.ingest_output(ended.job_id, worker_id)
            self._output_stored.add(worker_id)
        # A worker told that its work was over ended cleanly, whatever its exit says: an
        # adopted process's code cannot be known, and one that dies on its way out (while
        # shipping its last lines) leaves nothing undone.
        finished = store.worker_finished(worker_id)
        timed_out = ended.exit_code == worker_results.EXIT_BATCH_TIMEOUT
        if ended.exit_code == 0 or (ended.exit_code is None and finished and not ended.oom):
            state, message = WorkerState.SUCCEEDED, None
        elif timed_out:
            state, message = WorkerState.FAILED, "stopped itself: a batch ran past batch_timeout"
        elif ended.exit_code is None:
            # Gone, its exit code unknown (an adopted process, a lost Ray actor): do not blame
            # the predictor, make sure someone finishes its work.
            state, message = WorkerState.UNKNOWN, ended.reason
        else:
            state, message = WorkerState.FAILED, f"worker {ended.reason}"
        before = store.end_worker(
            worker_id, state, exit_code=ended.exit_code, error_message=message
        )
        self.service.pool.request()  # its capacity is free
        if before is None or state is WorkerState.SUCCEEDED or finished:
            # Recorded already (this exit seen again, or the leader marked the worker lost
            # first), or nothing left undone.
            return
        # In memory from here, so that nothing after the store's commit can lose it.
        self._deaths[worker_id] = _Death(
            ended.job_id,
            worker_id,
            f"worker {worker_id} {message if timed_out else ended.reason}",
            oom=ended.oom,
            before_init=before.state in _BEFORE_INIT and not timed_out,
            # Each such exit ended a batch's attempt, so they are bounded by the attempts:
            # they take nothing from the budget that ends a crash loop.
            counted=timed_out,
        )

    def _after_death(self, death: _Death) -> None:
        """A worker of a job died with work left, or was lost with its replica: give its
        batches back, and replace it or end the job. Every step may be taken again (after a
        store error) without being done twice, except that a failure inside starting the
        replacement may start a second one: the pool is then one larger, never smaller."""
        store = self.service.store
        job = store.get_job(death.job_id)
        if job is None or not job.status.in_progress:
            return
        reason = death.reason
        if job.completion_state == "claimed" and job.completion_worker == death.worker_id:
            # The hook may have half run; running it again could repeat its side effects.
            self.lifecycle.end_job(
                job.job_id,
                JobStatus.WORKER_OOM if death.oom else JobStatus.WORKER_ERROR,
                "batchapi.hook_worker_died",
                f"{reason} while running on_job_complete",
            )
            return
        kind = "worker_oom" if death.oom else "worker_died"
        store.release_worker_leases(job.job_id, death.worker_id, kind, reason)
        if death.oom:
            self.lifecycle.end_job(job.job_id, JobStatus.WORKER_OOM, "batchapi.worker_oom", reason)
            return
        if death.before_init:
            # It died before its predictor was loaded: another worker would most likely too.
            self.lifecycle.end_job(
                job.job_id,
                JobStatus.WORKER_ERROR,
                "batchapi.worker_exited",
                f"{reason} before the predictor was loaded (see the worker's log)",
            )
            return
        # A running worker died (killed, crashed, lost with its replica): its batches were
        # given back above; start a replacement, within a budget so that a job whose workers
        # keep dying still ends.
        budget = max(3, job.workers * job.max_attempts)
        if not death.counted:
            if not store.count_restart(job.job_id, budget):
                self.lifecycle.end_job(
                    job.job_id,
                    JobStatus.WORKER_ERROR,
                    "batchapi.worker_exited",
                    f"{reason}; {budget} workers were already replaced, giving up",
                )
                return
            death.counted = True
        self.lifecycle.job_event(job.job_id, f"{reason}; starting a replacement", "WARNING")
        # The scheduler places it: the job has batches left and one worker fewer.
        self.service.pool.request()

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
        """At start-up: adopt the workers this replica started before it restarted, and end
        the rows of those that are gone (giving their capacity back); the scheduler places new
        workers for jobs that need them. Other replicas' workers are theirs to watch (or the
        leader's)."""
        store = self.service.store
        mine = (None, self.service.replica_id)  # None: started before there were replicas
        for job in store.in_progress_jobs():
            workers = store.list_workers(job.job_id)
            gone = set()
            for worker in workers:
                if not worker.state.alive or worker.replica_id not in mine:
                    continue
                # By pid where the launcher has one (local); a Ray actor by its name, placed
                # or still waiting for a node.
                if self.service.launcher.adopt(job.job_id, worker.worker_id, worker.pid):
                    # Heartbeats failed while the server was down: the worker still holds its
                    # batches, so its leases must not expire on the first tick.
                    store.extend_worker_leases(job.job_id, worker.worker_id, self.settings.lease_s)
                    continue
                gone.add(worker.worker_id)
                if store.worker_finished(worker.worker_id):
                    # It was told its work was over and exited while the server was down.
                    store.end_worker(worker.worker_id, WorkerState.SUCCEEDED)
                    continue
                store.end_worker(
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
            alive = [w for w in workers if w.state.alive and w.worker_id not in gone]
            if job.completion_state == "claimed" and job.completion_worker not in {
                w.worker_id for w in alive
            }:
                # As when a hook's worker dies under a running server: no second run.
                self.lifecycle.end_job(
                    job.job_id,
                    JobStatus.WORKER_ERROR,
                    "batchapi.hook_worker_died",
                    f"worker {job.completion_worker} died while running on_job_complete",
                )
                continue
            if not alive and job.status is JobStatus.RUNNING:
                # The scheduler places new ones as capacity allows (`cortex.pool`).
                self.lifecycle.job_event(
                    job.job_id, "no live workers after a restart; new ones will start"
                )
