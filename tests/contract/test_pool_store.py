"""The worker pool in the store, on both engines: a pass places workers within capacity and
writes what it holds; a drained worker's lease hands back what it did not start without using
an attempt and ends its work (the same answer to a copy of the request); surplus workers leave
once there are more of them than batches; ended rows give their capacity back."""

from __future__ import annotations

from cortex.capacity import Resources
from cortex.jobs import BatchState, WorkerState
from cortex.store import Store
from cortex.store import tables as t
from cortex.store.records import BatchResult

API_SPEC = {
    "name": "api",
    "kind": "BatchAPI",
    "predictor": {"type": "python", "path": "predictor.py", "config": {}},
}
CPU1 = Resources(cpu=1.0)


def _job(store: Store, job_id: str, batches: int, workers: int, priority: int = 0) -> None:
    if store.get_api("api") is None:
        store.put_api("api", "spec1", API_SPEC, b"archive")
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=workers,
        config=None,
        timeout_s=None,
        max_attempts=3,
        worker_token="token",
        payloads=[f"[{i}]" for i in range(batches)],
        replica_id=None,
        priority=priority,
    )


def _loaded(store: Store, worker_id: str) -> None:
    job_id = worker_id.rsplit("-", 1)[0]
    store.report_state(job_id, worker_id, WorkerState.RUNNING, has_hook=False)


def test_a_pass_places_within_capacity_and_ended_rows_give_it_back(store: Store) -> None:
    _job(store, "job1", batches=10, workers=4)
    _job(store, "job2", batches=10, workers=4)
    capacity = Resources(cpu=2.0)
    _, placed = store.schedule(capacity, "r1", lambda _: CPU1)
    # Slow start: one each; both fit.
    assert placed == {"job1": ["job1-0"], "job2": ["job2-0"]}
    held = store.pool_usage()
    assert sorted(w.worker_id for w in held) == ["job1-0", "job2-0"]
    assert all(w.resources == CPU1 for w in held)
    _loaded(store, "job1-0")
    _loaded(store, "job2-0")
    _, placed = store.schedule(capacity, "r1", lambda _: CPU1)
    assert placed == {}
    job = store.get_job("job1")
    assert job is not None and job.pending_workers == 3
    assert job.pending_reason is not None and "cpu=1 (free 0)" in job.pending_reason
    # An exit ends the row and gives its room back: to job2, which has no worker now, before
    # job1 gets a second.
    store.end_worker("job2-0", WorkerState.SUCCEEDED)
    _, placed = store.schedule(capacity, "r1", lambda _: CPU1)
    assert placed == {"job2": ["job2-1"]}
    assert len(store.pool_usage()) == 2


def test_a_drained_worker_hands_back_what_it_did_not_start(store: Store) -> None:
    _job(store, "low", batches=6, workers=2)
    capacity = Resources(cpu=2.0)
    store.schedule(capacity, "r1", lambda _: CPU1)
    _loaded(store, "low-0")
    store.schedule(capacity, "r1", lambda _: CPU1)
    _loaded(store, "low-1")
    leased = store.lease("low", "low-1", [], 3, 30, seq=1)
    assert len(leased.batches) == 3
    _job(store, "high", batches=2, workers=1, priority=5)
    plan, placed = store.schedule(capacity, "r1", lambda _: CPU1)
    # The newest worker of the lower-priority job drains; the other keeps it going.
    assert placed == {} and plan.drain == ["low-1"]
    drained = "low-1"
    assert store.worker_draining(drained) and not store.worker_draining("low-0")
    # It finished one of its three batches: the other two go back unused, and its work is
    # over; the same request sent again gets the same answer and changes nothing.
    report = [BatchResult(leased.batches[0].batch_id, True, 0.1)]
    for _ in range(2):
        answer = store.lease("low", drained, report, 3, 30, seq=2)
        assert answer.batches == [] and answer.done
    with store.read() as conn:
        rows = conn.execute(
            t.batches.select().where(t.batches.c.job_id == "low").order_by(t.batches.c.seq)
        ).all()
    states = [(r.state, r.attempts) for r in rows]
    assert states[0] == (BatchState.SUCCEEDED.value, 1)
    assert states[1:3] == [(BatchState.QUEUED.value, 0)] * 2
    job = store.get_job("low")
    assert job is not None and job.succeeded == 1
    assert store.worker_finished(drained)
    # Once it has exited, the higher-priority job gets its place.
    store.end_worker(drained, WorkerState.SUCCEEDED)
    plan, placed = store.schedule(capacity, "r1", lambda _: CPU1)
    assert placed == {"high": ["high-0"]}


def test_surplus_workers_leave_when_batches_run_out(store: Store) -> None:
    _job(store, "job1", batches=2, workers=4)
    capacity = Resources(cpu=8.0)
    # Never more workers than batches (the pool has room: both at once, no slow start).
    _, placed = store.schedule(capacity, "r1", lambda _: CPU1)
    assert placed == {"job1": ["job1-0", "job1-1"]}
    _loaded(store, "job1-0")
    _loaded(store, "job1-1")
    _, placed = store.schedule(capacity, "r1", lambda _: CPU1)
    assert placed == {}
    first = store.lease("job1", "job1-0", [], 1, 30, seq=1)
    assert len(first.batches) == 1
    second = store.lease("job1", "job1-1", [], 1, 30, seq=1)
    assert len(second.batches) == 1
    # job1-0 reports; one batch is left (job1-1's), and two live workers: job1-0 leaves.
    done = store.lease(
        "job1", "job1-0", [BatchResult(first.batches[0].batch_id, True, 0.1)], 1, 30, seq=2
    )
    assert done.batches == [] and done.done and not done.run_hook
    # job1-1 finishes the last batch: the job completes as before.
    last = store.lease(
        "job1", "job1-1", [BatchResult(second.batches[0].batch_id, True, 0.1)], 1, 30, seq=2
    )
    assert last.done and last.final_status is not None


def test_a_worker_whose_row_has_ended_gets_no_more_batches(store: Store) -> None:
    _job(store, "job1", batches=4, workers=2)
    store.schedule(Resources(cpu=2.0), "r1", lambda _: CPU1)
    _loaded(store, "job1-0")
    # Taken for dead (its capacity given back), yet it still runs and asks for work.
    store.end_worker("job1-0", WorkerState.UNKNOWN, error_message="gone, supposedly")
    answer = store.lease("job1", "job1-0", [], 2, 30, seq=1)
    assert answer.batches == [] and answer.done
    assert store.batch_counts("job1")["queued"] == 4
