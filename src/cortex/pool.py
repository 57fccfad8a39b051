"""The worker pool: its capacity, the scheduling passes that place workers into it, and what
it looks like (`GET /capacity`).

A replica runs a pass when something changed on it (it accepted a job, in the request that
created it, so a job's first worker starts as fast as before; one of its workers loaded the
predictor or exited; a job ended), and the replica that holds the leader lease (the reconciler
sets `leads`) also runs one at least every second, which starts the workers that waited for
capacity whatever freed it. The workers a pass places are its replica's to start and watch.
Passes are serialised in the store, so replicas never place into the same room; replicas share
one pool (one machine, or one Ray cluster). The rules are `cortex.scheduling`'s; the accounting
is `store.pool`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cortex import capacity, errors, spec
from cortex.capacity import Resources
from cortex.launchers import Launcher
from cortex.launching import Launching
from cortex.lifecycle import Lifecycle
from cortex.settings import Settings
from cortex.store import Store

log = logging.getLogger("cortex.server")

# A pass runs at least this often on the leader, even when nothing asked for one: capacity
# that Ray gains, a lease that expired, a worker that exited on another replica, all show up
# within this.
_PERIOD_S = 1.0


class Pool:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        launcher: Launcher,
        lifecycle: Lifecycle,
        launching: Launching,
        replica_id: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.lifecycle = lifecycle
        self.launching = launching
        self.replica_id = replica_id
        self._overrides = capacity.parse(settings.capacity)
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._last_pass = 0.0
        # Jobs that were told (in their log) that they wait: once per wait, not per pass.
        self._told: set[str] = set()
        # What one worker of each API version takes (a spec id names one immutable version).
        self._sizes: dict[str, Resources] = {}
        self.leads: Callable[[], bool] = lambda: False

    def capacity(self) -> Resources:
        """The pool's total: what the launcher reports (this machine; the Ray cluster now),
        each resource replaced by the server's `--capacity` where it names it."""
        found = self.launcher.capacity()
        over = self._overrides
        return Resources(
            cpu=float(over.get("cpu", found.cpu)),
            mem=int(over.get("mem", found.mem)),
            gpu=int(over.get("gpu", found.gpu)),
        )

    def per_worker(self, spec_id: str) -> Resources:
        """What one worker of an API version takes from the pool."""
        size = self._sizes.get(spec_id)
        if size is None:
            api_spec = self.store.get_spec_json(spec_id)
            size = capacity.per_worker(spec.APISpec.model_validate(api_spec).compute)
            if len(self._sizes) > 1024:
                self._sizes.clear()
            self._sizes[spec_id] = size
        return size

    def request(self) -> None:
        """Something changed: the leader runs a pass on its next tick."""
        self._wanted.set()

    def tick(self) -> None:
        """The reconciler's task: a pass if one was asked for, or on the leader if the period
        passed."""
        if self._wanted.is_set() or (
            self.leads() and time.monotonic() - self._last_pass >= _PERIOD_S
        ):
            self.schedule()

    def schedule_now(self, expected: dict[str, int] | None = None) -> None:
        """A pass now (a job was just accepted here). `expected`: batches a job accepted here
        is about to write (an item list's), counted as its backlog already, so that its
        workers start together instead of one now and the rest once the batches are written."""
        self.schedule(expected)

    def schedule(self, expected: dict[str, int] | None = None) -> None:
        """One pass: place what fits, ask lower-priority workers to drain, start the placed
        workers, and say in each job's log what it waits for."""
        with self._lock:
            self._wanted.clear()
            self._last_pass = time.monotonic()
            plan, placed = self.store.schedule(
                self.capacity(), self.replica_id, self.per_worker, expected or {}
            )
            # Each wait is said once in the job's log, not on every pass.
            new_waits = {j: w for j, w in plan.waiting.items() if j not in self._told}
            self._told = set(plan.waiting)
        for worker_id in plan.drain:
            job_id = worker_id.rsplit("-", 1)[0]
            self.lifecycle.job_event(
                job_id,
                f"worker {worker_id} will finish its current batch and exit: its capacity "
                "goes to a job of higher priority",
            )
        for job_id, (count, reason) in new_waits.items():
            plural = "s" if count != 1 else ""
            self.lifecycle.job_event(job_id, f"{count} worker{plural} pending: {reason}")
        for job_id, worker_ids in placed.items():
            job = self.store.get_job(job_id)
            if job is not None:
                self.launching.start_workers(job, worker_ids)

    def usage(self) -> dict[str, Any]:
        """`GET /capacity`: the total, what live workers hold and what is free, per resource,
        and each job's share."""
        total = self.capacity()
        used = Resources()
        jobs: dict[str, dict[str, Any]] = {}
        for worker in self.store.pool_usage():
            used += worker.resources
            share = jobs.setdefault(
                worker.job_id, {"workers": 0, "draining": 0, "reserved": Resources()}
            )
            share["workers"] += 1
            share["draining"] += int(worker.draining)
            share["reserved"] += worker.resources
        for job in self.store.in_progress_jobs():
            share = jobs.setdefault(
                job.job_id, {"workers": 0, "draining": 0, "reserved": Resources()}
            )
            share.update(
                api_name=job.api_name,
                priority=job.priority,
                pending=job.pending_workers,
                pending_reason=job.pending_reason,
            )
        return {
            "total": total.to_json(),
            "used": used.to_json(),
            "free": (total - used).to_json(),
            "jobs": [
                {"job_id": job_id, **share, "reserved": share["reserved"].to_json()}
                for job_id, share in sorted(jobs.items())
            ],
        }

    def check_fits(self, compute: spec.Compute) -> None:
        """Refuse a job whose one worker could never fit in the pool (raised as a 400). Only
        where the pool cannot grow: a Ray cluster's autoscaler may add what is missing."""
        if not self.launcher.fixed_capacity:
            return
        need = capacity.per_worker(compute)
        total = self.capacity()
        if need.gpu > total.gpu:
            raise errors.InsufficientGpus(
                f"one worker of this job needs {need.gpu} GPUs; this server has {total.gpu} "
                "(set CORTEX_GPUS to declare them)"
            )
        missing = need.short_of(total)
        if missing:
            raise errors.InsufficientCapacity(
                "one worker of this API needs more than this server's whole capacity: "
                + ", ".join(m.replace("(free", "(capacity") for m in missing)
                + " (set --capacity or CORTEX_CAPACITY to declare more)"
            )
