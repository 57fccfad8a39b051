"""The scheduler's rules, as one pure function: given the pool's capacity, the workers that
hold part of it and the jobs that want workers, which jobs get how many new workers, which
workers are asked to drain (preemption), and why the rest wait.

The rules (docs/design.md, "Scheduling"):

1. A job wants at most `workers` workers, and never more than it has batches left to lease
   (queued or leased); while its dataset is still being enqueued, at least one. `min_workers`
   keeps that many while batches are left, even if fewer are leasable. A job with no batch left
   and no worker (its last batch ended with its worker's death) wants one, to complete it.
2. Slow start when the pool is tight: until one of a job's workers has loaded the predictor
   (reported `running`), the job gets one worker, unless the free capacity holds all the
   workers it wants and one more of their size besides. Jobs submitted together on a busy pool
   each get their first worker before any gets a second, and there a predictor that cannot load
   costs one process, not `workers`; a job alone on a roomy pool starts all its workers at once
   (its first batch is not held up by a model load per worker in turn).
3. Free capacity goes by `priority` (higher first); within one priority, level by level: every
   job gets its first worker before any gets a second, its second before any gets a third;
   within a level, the older job first. A job whose next worker does not fit does not hold up
   the others, but the first such job of a priority keeps its next worker's room reserved from
   lower priorities (so it is not starved by smaller, lower-priority workers).
4. Preemption: a job that still waits may ask workers of lower-priority jobs to drain: finish
   their current batch, hand their other leases back unused, and exit. A lower-priority job
   keeps `max(1, min_workers)` workers (every job makes progress) unless the waiting job has
   none at all. Workers draining already count as room on its way, so nothing is drained twice.
"""

from __future__ import annotations

import dataclasses

from cortex.capacity import Resources


@dataclasses.dataclass(frozen=True)
class Demand:
    """A job in progress, as the scheduler sees it."""

    job_id: str
    priority: int
    start_time: float
    per_worker: Resources
    max_workers: int  # the submission's `workers`
    min_workers: int
    backlog: int  # batches queued or leased
    enqueue_done: bool
    live: int  # workers placed and alive, not draining
    loaded: int  # of those, workers that have loaded the predictor (`running`)
    # Whether the free capacity holds every worker the job wants and one more (rule 2); set
    # by `plan` from the capacity free when the pass begins.
    roomy: bool = False

    @property
    def target(self) -> int:
        """How many live workers the job should have once it runs (rule 1)."""
        if self.backlog == 0 and self.enqueue_done:
            # Nothing left to lease. Its last results are on their way (their report decides
            # the completion), unless the last batch ended with its worker's death: then one
            # worker must ask, to complete the job and run its hook.
            return 1 if self.live == 0 else 0
        want = max(self.backlog, self.min_workers, 0 if self.enqueue_done else 1)
        return min(want, self.max_workers)

    @property
    def wanted(self) -> int:
        """How many live workers the job should have now (rules 1 and 2)."""
        want = self.target
        if self.loaded == 0 and not self.roomy:
            want = min(want, 1)
        return want


@dataclasses.dataclass(frozen=True)
class Held:
    """A live worker and what it holds of the pool."""

    worker_id: str
    job_id: str
    resources: Resources
    draining: bool
    started_at: float


@dataclasses.dataclass
class Plan:
    # New workers to place, by job.
    starts: dict[str, int] = dataclasses.field(default_factory=dict)
    # Workers to ask to drain.
    drain: list[str] = dataclasses.field(default_factory=list)
    # Jobs with workers they want and did not get: how many, and why.
    waiting: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    # The capacity left free once the plan's workers are placed.
    free: Resources = dataclasses.field(default_factory=Resources)


def plan(capacity: Resources, held: list[Held], demands: list[Demand]) -> Plan:
    used = Resources()
    for worker in held:
        used += worker.resources
    free = capacity - used
    result = Plan()
    demands = [
        dataclasses.replace(
            d, roomy=d.per_worker.times(max(0, d.target - d.live) + 1).fits_in(free)
        )
        for d in demands
    ]
    order = sorted(demands, key=lambda d: (-d.priority, d.start_time, d.job_id))
    given = {d.job_id: 0 for d in order}
    reasons: dict[str, str] = {}
    # Room kept for the first blocked job of a higher priority (rule 3).
    kept = Resources()
    for priority in sorted({d.priority for d in order}, reverse=True):
        tier = [d for d in order if d.priority == priority]
        room = free - kept
        blocked: set[str] = set()
        for level in range(1, max((d.wanted for d in tier), default=0) + 1):
            for demand in tier:
                have = demand.live + given[demand.job_id]
                if demand.job_id in blocked or have >= demand.wanted or have >= level:
                    continue
                if demand.per_worker.fits_in(room):
                    room -= demand.per_worker
                    free -= demand.per_worker
                    given[demand.job_id] += 1
                    continue
                blocked.add(demand.job_id)
                reasons[demand.job_id] = _why(demand, free)
        first_blocked = next((d for d in tier if d.job_id in blocked), None)
        if first_blocked is not None:
            kept += first_blocked.per_worker
    result.starts = {job: count for job, count in given.items() if count}
    result.free = free
    result.drain = _preempt(order, held, given, free)
    for demand in order:
        short = demand.wanted - demand.live - given[demand.job_id]
        if short > 0:
            reason = reasons.get(demand.job_id) or f"waiting for capacity (free {free})"
            result.waiting[demand.job_id] = (short, reason)
    return result


def _why(demand: Demand, free: Resources) -> str:
    missing = demand.per_worker.short_of(free)
    if missing:
        return "waiting for capacity: a worker needs " + ", ".join(missing)
    # It would fit, but the room is kept for a job of higher priority that waits too.
    return "waiting for capacity: the free room is kept for higher-priority jobs"


def _preempt(
    order: list[Demand], held: list[Held], given: dict[str, int], free: Resources
) -> list[str]:
    """Rule 4: the workers to drain so that waiting jobs get room, highest priority first."""
    by_job = {d.job_id: d for d in order}
    # Room on its way: what workers draining already will give back.
    coming = free
    for worker in held:
        if worker.draining:
            coming += worker.resources
    live = {d.job_id: d.live + given[d.job_id] for d in order}
    candidates = [w for w in held if not w.draining and w.job_id in by_job]
    drain: list[str] = []
    for waiting in order:
        short = waiting.wanted - live[waiting.job_id]
        while short > 0:
            # The victims that would make room for one more worker; none are asked unless
            # together they do (draining workers that hold the wrong resource helps nobody).
            chosen: list[Held] = []
            room = coming
            while not waiting.per_worker.fits_in(room):
                victim = _victim(waiting, [c for c in candidates if c not in chosen], by_job, live)
                if victim is None:
                    break
                chosen.append(victim)
                live[victim.job_id] -= 1
                room += victim.resources
            if not waiting.per_worker.fits_in(room):
                for victim in chosen:
                    live[victim.job_id] += 1
                break
            for victim in chosen:
                candidates.remove(victim)
                drain.append(victim.worker_id)
            coming = room - waiting.per_worker
            live[waiting.job_id] += 1
            short -= 1
    return drain


def _victim(
    waiting: Demand, candidates: list[Held], by_job: dict[str, Demand], live: dict[str, int]
) -> Held | None:
    """The worker to drain for `waiting`: of a lower-priority job above what it keeps; the
    lowest priority first, then the job with the most workers, then the newest job and the
    newest worker."""
    best: tuple[tuple[int, int, float, float], Held] | None = None
    for worker in candidates:
        owner = by_job[worker.job_id]
        if owner.priority >= waiting.priority:
            continue
        keeps = max(1, owner.min_workers) if live[waiting.job_id] > 0 else 0
        if live[owner.job_id] <= keeps:
            continue
        key = (owner.priority, -live[owner.job_id], -owner.start_time, -worker.started_at)
        if best is None or key < best[0]:
            best = (key, worker)
    return None if best is None else best[1]
