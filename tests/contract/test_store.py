"""The store's state transitions: leasing, results, retries, completion, statuses."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from cortex.jobs import JobStatus, WorkerState
from cortex.store import Store, engine
from cortex.store import tables as t
from cortex.store.records import BatchResult

API_SPEC: dict[str, Any] = {"name": "api", "kind": "BatchAPI", "predictor": {"config": {}}}


def _job(
    store: Store, batches: int = 3, max_attempts: int = 2, job_id: str = "job1", hook: bool = False
) -> str:
    if store.get_api("api") is None:
        store.put_api("api", "spec1", API_SPEC, b"archive")
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=2,
        config=None,
        timeout_s=None,
        max_attempts=max_attempts,
        worker_token="token",
        payloads=(f"[{i}]" for i in range(batches)),
        replica_id="r1",
    )
    store.set_has_hook(job_id, hook)
    return job_id


def ok(batch_id: str) -> BatchResult:
    return BatchResult(batch_id, True, 0.01)


def fail(batch_id: str) -> BatchResult:
    return BatchResult(batch_id, False, 0.01, "ValueError: no", "Traceback ...")


def test_deploy_results(store: Store) -> None:
    assert store.put_api("api", "s1", API_SPEC, b"a") == "created"
    assert store.put_api("api", "s1", API_SPEC, b"a") == "up_to_date"
    assert store.put_api("api", "s2", API_SPEC, b"b") == "updated"
    api = store.get_api("api")
    assert api is not None and api.spec_id == "s2"
    assert store.get_spec("s2") == (API_SPEC, b"b")


def test_a_job_is_durable_and_running_once_created(store: Store) -> None:
    job_id = _job(store, batches=5)
    job = store.get_job(job_id)
    assert job is not None
    assert job.status is JobStatus.RUNNING
    assert job.total_batch_count == 5
    assert store.batch_counts(job_id) == {"queued": 5, "leased": 0, "succeeded": 0, "failed": 0}


def test_a_jobs_progress_is_its_row_and_its_counts(store: Store) -> None:
    assert store.job_progress("nope") is None
    job_id = _job(store, batches=3)
    store.update_worker("job1-0", WorkerState.RUNNING)
    batch = store.lease(job_id, "job1-0", [], 1, 30).batches[0]
    progress = store.job_progress(job_id)
    assert progress is not None
    job, batches, workers = progress
    assert job.job_id == job_id and job.status is JobStatus.RUNNING
    assert batches == {"queued": 2, "leased": 1, "succeeded": 0, "failed": 0}
    assert workers is not None and (workers["running"], workers["pending"]) == (1, 1)
    store.lease(job_id, "job1-0", [ok(batch.batch_id)], 0, 30)
    assert store.set_status(job_id, JobStatus.STOPPED)
    job, batches, workers = store.job_progress(job_id) or (None, {}, {})
    assert job is not None and job.status.terminal
    assert batches["succeeded"] == 1 and workers is None  # workers are counted while it runs


def test_create_job_writes_nothing_when_the_payloads_fail(store: Store) -> None:
    store.put_api("api", "spec1", API_SPEC, b"a")

    def payloads() -> Any:
        yield "[1]"
        raise ValueError("item too large")

    with pytest.raises(ValueError):
        store.create_job(
            job_id="bad",
            api_name="api",
            workers=1,
            config=None,
            timeout_s=None,
            max_attempts=1,
            worker_token="t",
            payloads=payloads(),
            replica_id="r1",
        )
    assert store.get_job("bad") is None
    assert store.list_jobs("api") == []


def test_lease_hands_out_each_batch_once_in_order(store: Store) -> None:
    job_id = _job(store, batches=5)
    first = store.lease(job_id, "w1", [], 2, 30)
    second = store.lease(job_id, "w2", [], 10, 30)
    assert [b.payload for b in first.batches] == [b"[0]", b"[1]"]
    assert [b.payload for b in second.batches] == [b"[2]", b"[3]", b"[4]"]
    assert all(b.attempt == 1 for b in first.batches + second.batches)
    nothing = store.lease(job_id, "w3", [], 10, 30)
    # Batches are still leased by others: the worker waits, it is not done.
    assert nothing.batches == [] and not nothing.done and not nothing.run_hook


def test_results_are_counted_once_and_the_last_one_completes_the_job(store: Store) -> None:
    job_id = _job(store, batches=2)
    leased = store.lease(job_id, "w1", [], 2, 30).batches
    results = [ok(b.batch_id) for b in leased]
    reply = store.lease(job_id, "w1", results, 2, 30)
    assert reply.done and not reply.run_hook
    # The same results again (a retried request) change nothing.
    store.lease(job_id, "w1", results, 2, 30)
    job = store.get_job(job_id)
    assert job is not None
    assert (job.succeeded, job.failed, job.status) == (2, 0, JobStatus.SUCCEEDED)
    assert job.end_time is not None
    assert job.succeeded_time_s == pytest.approx(0.02)


def test_near_the_end_workers_lease_a_fair_share_of_what_is_left(store: Store) -> None:
    # Workers that are not leasing yet (pending) do not count: one worker gets what it asks.
    alone = _job(store, batches=10, job_id="job2")
    assert len(store.lease(alone, "job2-0", [], 100, 30).batches) == 10
    # Two workers leasing: a big prefetch takes half of what is left, not all of it.
    job_id = _job(store, batches=10)
    store.update_worker("job1-0", WorkerState.RUNNING)
    store.update_worker("job1-1", WorkerState.RUNNING)
    first = store.lease(job_id, "job1-0", [], 100, 30).batches
    assert len(first) == 5
    assert len(store.lease(job_id, "job1-1", [], 100, 30).batches) == 5
    # Far from the end, the worker's own ask is the limit.
    big = _job(store, batches=100, job_id="job3")
    store.update_worker("job3-0", WorkerState.RUNNING)
    store.update_worker("job3-1", WorkerState.RUNNING)
    assert len(store.lease(big, "job3-0", [], 20, 30).batches) == 20


def test_a_lease_whose_answer_was_lost_is_given_back_to_the_next_request(store: Store) -> None:
    job_id = _job(store, batches=3)
    lost = store.lease(job_id, "w1", [], 2, 30).batches  # the answer never reaches w1
    # w1 asks again (the same request, or its next one): what it never got comes back to it,
    # as the same batches and without using an attempt.
    again = store.lease(job_id, "w1", [], 2, 30).batches
    assert [(b.batch_id, b.attempt) for b in again] == [(b.batch_id, 1) for b in lost]
    reply = store.lease(job_id, "w1", [ok(b.batch_id) for b in again], 2, 30)
    assert len(reply.batches) == 1
    final = store.lease(job_id, "w1", [ok(reply.batches[0].batch_id)], 2, 30)
    assert final.done
    job = store.get_job(job_id)
    assert job is not None and (job.succeeded, job.status) == (3, JobStatus.SUCCEEDED)


def test_results_from_a_worker_that_lost_its_lease_are_dropped(store: Store) -> None:
    job_id = _job(store, batches=1)
    batch = store.lease(job_id, "w1", [], 1, 30).batches[0]
    store.lease(job_id, "w2", [ok(batch.batch_id)], 1, 30)  # w2 never held it
    job = store.get_job(job_id)
    assert job is not None and job.succeeded == 0


def test_a_failed_batch_is_retried_with_the_same_id_then_failed(store: Store) -> None:
    job_id = _job(store, batches=1, max_attempts=2)
    first = store.lease(job_id, "w1", [], 1, 30).batches[0]
    again = store.lease(job_id, "w1", [fail(first.batch_id)], 1, 30).batches[0]
    assert again.batch_id == first.batch_id
    assert again.attempt == 2
    reply = store.lease(job_id, "w1", [fail(again.batch_id)], 1, 30)
    assert reply.done
    job = store.get_job(job_id)
    assert job is not None
    assert (job.succeeded, job.failed) == (0, 1)
    assert job.status is JobStatus.COMPLETED_WITH_FAILURES
    [failed] = store.failed_batches(job_id)
    assert failed["attempts"] == 2
    assert failed["error"] == "ValueError: no"
    assert failed["traceback"] == "Traceback ..."


def test_an_ended_jobs_succeeded_payloads_are_pruned_and_failed_ones_kept(store: Store) -> None:
    ended = _job(store, batches=3, max_attempts=1)
    running = _job(store, batches=2, job_id="job2")
    a, b, c = store.lease(ended, "w1", [], 3, 30).batches
    store.lease(ended, "w1", [ok(a.batch_id), fail(b.batch_id), ok(c.batch_id)], 0, 30)
    first = store.lease(running, "w2", [], 1, 30).batches[0]
    store.lease(running, "w2", [ok(first.batch_id)], 0, 30)
    job = store.get_job(ended)
    assert job is not None and job.status is JobStatus.COMPLETED_WITH_FAILURES

    assert store.prune_payloads(chunk=1) == 2  # in chunks of one, until nothing is left
    assert store.prune_payloads() == 0
    with store.engine.connect() as conn:
        left = conn.execute(
            sa.select(t.batch_payloads.c.job_id, t.batch_payloads.c.seq).order_by(
                t.batch_payloads.c.job_id, t.batch_payloads.c.seq
            )
        ).all()
    # The failed batch (seq 1) and every batch of the running job keep their payloads.
    assert [tuple(row) for row in left] == [("job1", 1), ("job2", 0), ("job2", 1)]
    assert list(store.failed_payloads(ended)) == ["[1]"]
    assert store.failed_batches(ended)[0]["payload"] == [1]


def test_the_hook_is_claimed_by_exactly_one_worker(store: Store) -> None:
    job_id = _job(store, batches=2, hook=True)
    a = store.lease(job_id, "w1", [], 1, 30).batches[0]
    b = store.lease(job_id, "w2", [], 1, 30).batches[0]
    replies: dict[str, Any] = {}

    def report(worker: str, batch_id: str) -> None:
        replies[worker] = store.lease(job_id, worker, [ok(batch_id)], 1, 30)

    threads = [
        threading.Thread(target=report, args=("w1", a.batch_id)),
        threading.Thread(target=report, args=("w2", b.batch_id)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Whoever reported second ended the last batch, and only that worker runs the hook.
    hooks = [worker for worker, reply in replies.items() if reply.run_hook]
    assert len(hooks) == 1
    job = store.get_job(job_id)
    assert job is not None and job.status is JobStatus.RUNNING  # until the hook reports
    other = "w2" if hooks[0] == "w1" else "w1"
    assert store.lease(job_id, other, [], 1, 30).done
    assert store.finish_hook(job_id, other, None, None).status is JobStatus.RUNNING  # not its claim
    assert store.finish_hook(job_id, hooks[0], None, None).status is JobStatus.SUCCEEDED
    assert store.finish_hook(job_id, hooks[0], None, None).status is JobStatus.SUCCEEDED


def test_a_failing_hook_ends_the_job_as_worker_error(store: Store) -> None:
    job_id = _job(store, batches=1, hook=True)
    batch = store.lease(job_id, "w1", [], 1, 30).batches[0]
    assert store.lease(job_id, "w1", [ok(batch.batch_id)], 1, 30).run_hook
    status = store.finish_hook(job_id, "w1", "OSError: disk full", "Traceback ...").status
    assert status is JobStatus.WORKER_ERROR
    job = store.get_job(job_id)
    assert job is not None and "disk full" in (job.error_message or "")


def test_expired_leases_come_back_then_fail_after_the_last_attempt(store: Store) -> None:
    job_id = _job(store, batches=1, max_attempts=2)
    first = store.lease(job_id, "w1", [], 1, lease_s=-1).batches[0]
    assert store.expire_leases() == 1
    second = store.lease(job_id, "w2", [], 1, lease_s=-1).batches[0]
    assert second.batch_id == first.batch_id and second.attempt == 2
    assert store.expire_leases() == 1
    job = store.get_job(job_id)
    assert job is not None and job.failed == 1
    assert "lease expired" in store.failed_batches(job_id)[0]["error"]
    assert store.lease(job_id, "w2", [], 1, 30).done


def test_heartbeats_keep_a_lease(store: Store) -> None:
    job_id = _job(store, batches=1)
    store.lease(job_id, "w1", [], 1, lease_s=0.05)
    time.sleep(0.01)
    assert store.heartbeat(job_id, "w1", lease_s=60)
    time.sleep(0.06)
    assert store.expire_leases() == 0


def test_a_terminal_status_never_changes_and_frees_leases(store: Store) -> None:
    job_id = _job(store, batches=2)
    leased = store.lease(job_id, "w1", [], 1, 30).batches
    assert store.set_status(job_id, JobStatus.STOPPED)
    assert not store.set_status(job_id, JobStatus.SUCCEEDED)
    assert not store.set_status(job_id, JobStatus.RUNNING)
    job = store.get_job(job_id)
    assert job is not None and job.status is JobStatus.STOPPED and job.end_time is not None
    # Nothing is leased after a stop, and late results are ignored.
    reply = store.lease(job_id, "w1", [ok(leased[0].batch_id)], 5, 30)
    assert reply.done and reply.batches == []
    job = store.get_job(job_id)
    assert job is not None and job.succeeded == 0
    assert not store.heartbeat(job_id, "w1", 30)


def test_worker_states_and_counts(store: Store) -> None:
    job_id = _job(store)
    # create_job wrote the rows of the job's two workers, owned by the replica that starts them.
    assert [(w.worker_id, w.state, w.replica_id) for w in store.list_workers(job_id)] == [
        ("job1-0", WorkerState.PENDING, "r1"),
        ("job1-1", WorkerState.PENDING, "r1"),
    ]
    store.update_worker("job1-0", WorkerState.RUNNING, pid=123)
    store.update_worker("job1-1", WorkerState.FAILED, exit_code=1)
    store.update_worker("job1-1", WorkerState.RUNNING)  # an ended worker stays ended
    counts = store.worker_counts(job_id)
    assert counts["running"] == 1 and counts["failed"] == 1 and counts["pending"] == 0
    assert [w.pid for w in store.list_workers(job_id)] == [123, None]


def test_delete_api_erases_its_history(store: Store) -> None:
    job_id = _job(store)
    store.delete_api("api")
    assert store.get_api("api") is None
    assert store.get_job(job_id) is None


def test_a_database_error_is_told_without_its_sql(store: Store) -> None:
    """A job's error says what the database said, not the statement and its parameters."""
    with pytest.raises(sa.exc.IntegrityError) as raised, store.write() as conn:
        conn.execute(sa.text("CREATE TEMPORARY TABLE t (k INTEGER PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO t (k) VALUES (:k)"), [{"k": 1}, {"k": 1}])
    reason = engine.error_reason(raised.value)
    assert reason.startswith("the store failed: ") and len(reason.splitlines()) == 1
    assert "INSERT" not in reason and "unique" in reason.lower(), reason
