"""The scheduler's rules (`cortex.scheduling.plan`), without servers: capacity, slow start,
backlog scaling, priority, fairness, age, reserved room, and preemption."""

from __future__ import annotations

import pytest

from cortex import capacity, errors, jobspec, scheduling, spec
from cortex.capacity import Resources
from cortex.scheduling import Demand, Held

CPU1 = Resources(cpu=1.0)


def demand(job_id: str, **fields: object) -> Demand:
    values: dict[str, object] = {
        "job_id": job_id,
        "priority": 0,
        "start_time": float(job_id.strip("job") or 0),
        "per_worker": CPU1,
        "max_workers": 2,
        "min_workers": 0,
        "backlog": 100,
        "enqueue_done": True,
        "live": 0,
        "loaded": 1,
    }
    values.update(fields)
    return Demand(**values)  # type: ignore[arg-type]


def held(job_id: str, count: int, draining: bool = False, size: Resources = CPU1) -> list[Held]:
    return [Held(f"{job_id}-{i}", job_id, size, draining, float(i)) for i in range(count)]


def test_workers_never_exceed_capacity_and_equal_jobs_share_level_by_level() -> None:
    jobs = [demand("job1"), demand("job2"), demand("job3")]
    plan = scheduling.plan(Resources(cpu=2.0), [], jobs)
    # Each job's first worker before any second; the older jobs first within a level.
    assert plan.starts == {"job1": 1, "job2": 1}
    assert plan.waiting["job3"][0] == 2
    assert "cpu=1 (free 0)" in plan.waiting["job3"][1]
    assert plan.waiting["job1"][0] == 1
    assert not plan.drain  # one priority: nobody is preempted

    # With a worker of job1 gone, job3 (no worker yet) gets the room before job1 a second.
    plan = scheduling.plan(
        Resources(cpu=2.0),
        held("job2", 1),
        [demand("job1"), demand("job2", live=1), demand("job3")],
    )
    assert plan.starts == {"job1": 1}
    plan = scheduling.plan(
        Resources(cpu=2.0),
        held("job1", 1),
        [demand("job1", live=1), demand("job2", live=0), demand("job3")],
    )
    assert plan.starts == {"job2": 1}


def test_a_job_never_wants_more_workers_than_batches_left() -> None:
    assert demand("job1", max_workers=8, backlog=3).wanted == 3
    assert demand("job1", max_workers=8, backlog=0, live=1).wanted == 0
    # No batch left and no worker: the last batch failed with its worker; one completes it.
    assert demand("job1", max_workers=8, backlog=0).wanted == 1
    # While enqueuing, one to start on the first batches; min_workers kept while batches left.
    assert demand("job1", backlog=0, enqueue_done=False).wanted == 1
    assert demand("job1", max_workers=8, min_workers=4, backlog=2).wanted == 4
    plan = scheduling.plan(Resources(cpu=16.0), [], [demand("job1", max_workers=8, backlog=3)])
    assert plan.starts == {"job1": 3} and not plan.waiting


def test_slow_start_one_worker_until_the_predictor_has_loaded() -> None:
    assert demand("job1", max_workers=8, loaded=0).wanted == 1
    plan = scheduling.plan(Resources(cpu=8.0), [], [demand("job1", max_workers=8, loaded=0)])
    assert plan.starts == {"job1": 1} and not plan.waiting
    plan = scheduling.plan(
        Resources(cpu=8.0), held("job1", 1), [demand("job1", max_workers=8, live=1, loaded=0)]
    )
    assert plan.starts == {}


def test_no_slow_start_on_a_pool_with_room_for_every_worker_and_one_more() -> None:
    small = Resources(cpu=0.2)  # the default compute: 10 such workers on 2 cores
    job = demand("job1", max_workers=2, loaded=0, per_worker=small)
    plan = scheduling.plan(Resources(cpu=2.0), [], [job])
    assert plan.starts == {"job1": 2} and not plan.waiting
    # Exactly room for all of them, none to spare: slow start again.
    plan = scheduling.plan(Resources(cpu=0.4), [], [job])
    assert plan.starts == {"job1": 1}
    # What others hold counts: with 1.6 of 2 cores held, two more do not leave room for one.
    plan = scheduling.plan(Resources(cpu=2.0), held("job0", 8, size=small), [job])
    assert plan.starts == {"job1": 1}


def test_higher_priority_first_and_a_blocked_job_keeps_its_room() -> None:
    jobs = [
        demand("job1", priority=0, max_workers=4, live=2),
        demand("job2", priority=5, max_workers=1, per_worker=Resources(cpu=3.0)),
    ]
    # job2 (higher) needs 3 CPUs; 2 are free: job1 must not take them from under it.
    plan = scheduling.plan(Resources(cpu=4.0), held("job1", 2), jobs)
    assert "job1" not in plan.starts
    assert plan.waiting["job2"][0] == 1
    # And job1's workers above one are asked to drain for it.
    assert plan.drain == ["job1-1"]


def test_preemption_takes_lower_priorities_down_to_one_worker_each() -> None:
    capacity4 = Resources(cpu=4.0)
    low_a = demand("job1", priority=0, max_workers=4, live=3)
    low_b = demand("job2", priority=1, max_workers=4, live=1)
    high = demand("job3", priority=9, max_workers=4, live=0)
    workers = held("job1", 3) + held("job2", 1)
    plan = scheduling.plan(capacity4, workers, [low_a, low_b, high])
    assert plan.starts == {}
    # The lowest priority first, the newest worker first; once job3 has a worker on its
    # way, job1 and job2 each keep one.
    assert plan.drain == ["job1-2", "job1-1"]
    # Workers draining already are room on its way: nothing more is drained next time.
    draining = [
        *held("job1", 1),
        Held("job1-1", "job1", CPU1, True, 1.0),
        Held("job1-2", "job1", CPU1, True, 2.0),
        *held("job2", 1),
    ]
    again = scheduling.plan(
        capacity4, draining, [demand("job1", max_workers=4, live=1), low_b, high]
    )
    assert again.drain == []


def test_equal_priorities_are_never_preempted() -> None:
    plan = scheduling.plan(
        Resources(cpu=2.0), held("job1", 2), [demand("job1", live=2), demand("job2")]
    )
    assert plan.drain == [] and plan.waiting["job2"][0] == 2


def test_min_workers_protects_a_lower_priority_job() -> None:
    plan = scheduling.plan(
        Resources(cpu=3.0),
        held("job1", 3),
        [demand("job1", max_workers=3, min_workers=3, live=3), demand("job2", priority=1, live=1)],
    )
    assert plan.drain == []


def test_memory_and_gpus_are_counted() -> None:
    big = Resources(cpu=0.5, mem=3 << 30, gpu=1)
    jobs = [demand("job1", per_worker=big, max_workers=4)]
    plan = scheduling.plan(Resources(cpu=8.0, mem=8 << 30, gpu=4), [], jobs)
    assert plan.starts == {"job1": 2}
    assert "mem=3Gi (free 2Gi)" in plan.waiting["job1"][1]


def test_capacity_is_parsed_like_kubernetes_quantities() -> None:
    assert capacity.parse("cpu=8,mem=16Gi,gpu=2") == {"cpu": 8.0, "mem": 16 * 2**30, "gpu": 2.0}
    assert capacity.parse("cpu=500m") == {"cpu": 0.5}
    assert capacity.parse("") == {}
    for bad in ("cpu", "disk=1", "mem=lots", "gpu=1.5"):
        with pytest.raises(ValueError, match="CORTEX_CAPACITY"):
            capacity.parse(bad)
    local = capacity.local({"mem": 1 << 30}, 0)
    assert local.mem == 1 << 30 and local.cpu >= 1
    worker = capacity.per_worker(spec.Compute(cpu="1500m", mem="512Mi", gpu=1))
    assert worker == Resources(cpu=1.5, mem=512 << 20, gpu=1)
    assert capacity.per_worker(spec.Compute()) == Resources(cpu=0.2)


def test_a_higher_priority_job_with_no_worker_may_take_a_lower_jobs_last() -> None:
    plan = scheduling.plan(
        Resources(cpu=1.0), held("job1", 1), [demand("job1", live=1), demand("job2", priority=1)]
    )
    assert plan.drain == ["job1-0"] and plan.starts == {}


def test_priority_and_min_workers_are_checked_at_submission() -> None:
    base = {"workers": 2, "item_list": {"items": [1], "batch_size": 1}}
    parsed = jobspec.parse_submission({**base, "priority": -3, "min_workers": 2})
    assert (parsed.priority, parsed.min_workers) == (-3, 2)
    assert jobspec.parse_submission(base).priority == 0
    with pytest.raises(errors.InvalidRequest, match="priority: must be an integer"):
        jobspec.parse_submission({**base, "priority": True})
    with pytest.raises(errors.InvalidSubmission, match="between 0 and workers") as refused:
        jobspec.parse_submission({**base, "min_workers": 3})
    assert refused.value.kind == "batchapi.invalid_min_workers"
    with pytest.raises(errors.InvalidSubmission, match="priority"):
        jobspec.parse_submission({**base, "priority": 2**40})


def test_nothing_is_drained_that_would_not_make_room() -> None:
    # The waiting job needs a GPU; the lower-priority workers hold only CPUs.
    gpu_job = demand("job2", priority=5, per_worker=Resources(cpu=1.0, gpu=1))
    plan = scheduling.plan(
        Resources(cpu=2.0, gpu=0), held("job1", 2), [demand("job1", live=2), gpu_job]
    )
    assert plan.drain == [] and plan.waiting["job2"][0] == 2
