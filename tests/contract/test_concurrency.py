"""The store under concurrent writers: many workers leasing from one job at once, stops, lease
expiry and deploys racing them, several processes on one PostgreSQL database.

Each test runs on both engines (SQLite serialises its writers; PostgreSQL runs them at once
under READ COMMITTED). The assertions are invariants, not timings: every batch leased to one
worker per attempt, counted once, the completion claimed by exactly one.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import sqlalchemy as sa

from cortex.jobs import BatchState, JobStatus
from cortex.store import Store, schema
from cortex.store import tables as t
from cortex.store.cluster import Cluster
from cortex.store.records import BatchResult
from helpers import wait_for
from worker_loop import Record, run_in_process, work

API_SPEC: dict[str, Any] = {"name": "api", "kind": "BatchAPI", "predictor": {"config": {}}}
WORKERS = 8


def _job(store: Store, batches: int, job_id: str = "job1", hook: bool = True) -> str:
    if store.get_api("api") is None:
        store.put_api("api", "spec1", API_SPEC, b"archive")
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=WORKERS,
        config=None,
        timeout_s=None,
        max_attempts=3,
        worker_token="token",
        # Every 7th batch fails its first attempt, so batches also come back to the queue.
        payloads=(f'["{"flaky" if i % 7 == 0 else "ok"}", {i}]' for i in range(batches)),
        replica_id="r1",
    )
    store.set_has_hook(job_id, hook)
    return job_id


def _run_workers(store: Store, job_id: str, count: int = WORKERS) -> Record:
    record = Record()
    start = threading.Barrier(count)
    threads = [
        threading.Thread(target=work, args=(store, job_id, f"{job_id}-w{i}", record, start))
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not record.errors, record.errors
    return record


def _batch_states(store: Store, job_id: str) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.batches.c.state, sa.func.count())
            .where(t.batches.c.job_id == job_id)
            .group_by(t.batches.c.state)
        ).all()
    return {state: n for state, n in rows}


def _assert_each_attempt_leased_once(record: Record, batches: int) -> None:
    attempts = [(batch_id, attempt) for batch_id, attempt, _ in record.leased]
    assert len(attempts) == len(set(attempts)), "a batch attempt was leased twice"
    assert len({batch_id for batch_id, _ in attempts}) == batches
    # The flaky ones ran twice, the others once.
    assert len(attempts) == batches + len(range(0, batches, 7))


def test_workers_leasing_at_once_never_share_a_batch(store: Store) -> None:
    batches = 300
    job_id = _job(store, batches)

    record = _run_workers(store, job_id)

    _assert_each_attempt_leased_once(record, batches)
    assert len(record.hooks) == 1, record.hooks
    job = store.get_job(job_id)
    assert job is not None
    assert (job.status, job.succeeded, job.failed) == (JobStatus.SUCCEEDED, batches, 0)
    assert _batch_states(store, job_id) == {BatchState.SUCCEEDED.value: batches}


def test_without_a_hook_the_last_result_completes_the_job_once(store: Store) -> None:
    batches = 120
    job_id = _job(store, batches, hook=False)

    record = _run_workers(store, job_id)

    _assert_each_attempt_leased_once(record, batches)
    assert record.hooks == []
    job = store.get_job(job_id)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.completion_state == "done" and job.end_time is not None


def test_a_stop_racing_busy_workers_leaves_nothing_leased_or_counted_after_it(
    store: Store,
) -> None:
    job_id = _job(store, 2000)
    record = Record()
    start = threading.Barrier(WORKERS + 1)
    threads = [
        threading.Thread(target=work, args=(store, job_id, f"w{i}", record, start))
        for i in range(WORKERS)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    # Stop while the workers are leasing and reporting.
    wait_for(lambda: len(record.leased) >= 50 or record.errors, 30, "the workers to lease")
    assert store.set_status(job_id, JobStatus.STOPPED)
    stopped = store.get_job(job_id)
    for thread in threads:
        thread.join(60)
    assert not record.errors, record.errors

    job = store.get_job(job_id)
    assert job is not None and stopped is not None
    assert job.status is JobStatus.STOPPED
    # Nothing was counted after the stop, and nothing is left leased.
    assert (job.succeeded, job.failed) == (stopped.succeeded, stopped.failed)
    states = _batch_states(store, job_id)
    assert BatchState.LEASED.value not in states
    assert states.get(BatchState.SUCCEEDED.value, 0) == job.succeeded


def test_lease_expiry_racing_results_counts_every_batch_once(store: Store) -> None:
    batches = 200
    job_id = _job(store, batches, hook=False)
    done = threading.Event()
    expired: list[int] = []

    def expire() -> None:
        while not done.is_set():
            expired.append(store.expire_leases())

    expirer = threading.Thread(target=expire)
    expirer.start()
    record = Record()
    start = threading.Barrier(4)

    def short_leases(worker: str) -> None:
        # Leases that are already over when granted: the expirer takes batches back while
        # the worker reports them.
        try:
            start.wait()
            results: list[BatchResult] = []
            while True:
                reply = store.lease(job_id, worker, results, 4, lease_s=-1)
                results = [BatchResult(b.batch_id, True, 0.001) for b in reply.batches]
                record.leased.extend((b.batch_id, b.attempt, worker) for b in reply.batches)
                if reply.done:
                    return
                if not reply.batches:
                    time.sleep(0.002)
        except BaseException as err:
            record.errors.append(err)

    threads = [threading.Thread(target=short_leases, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    expirer.join(10)
    assert not record.errors, record.errors

    job = store.get_job(job_id)
    assert job is not None and job.status.terminal
    states = _batch_states(store, job_id)
    # Whatever the interleaving, the counters are exactly the batch rows.
    assert states.get(BatchState.SUCCEEDED.value, 0) == job.succeeded
    assert states.get(BatchState.FAILED.value, 0) == job.failed
    assert job.succeeded + job.failed == batches
    attempts = [(batch_id, attempt) for batch_id, attempt, _ in record.leased]
    assert len(attempts) == len(set(attempts))


def test_concurrent_deploys_of_a_new_api_agree(store: Store) -> None:
    results: list[str] = []
    failures: list[BaseException] = []
    start = threading.Barrier(6)

    def deploy(spec_id: str) -> None:
        try:
            start.wait()
            results.append(store.put_api("new", spec_id, API_SPEC, spec_id.encode()))
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=deploy, args=(f"s{i % 2}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures, failures
    assert results.count("created") == 1
    api = store.get_api("new")
    assert api is not None
    # The versions no one uses any more were dropped; the deployed one is there.
    assert store.get_spec(api.spec_id)[1] == api.spec_id.encode()


def test_workers_added_at_once_get_distinct_ids(store: Store) -> None:
    job_id = _job(store, 1)
    ids: list[str] = []
    start = threading.Barrier(4)

    def add(replica: str) -> None:
        start.wait()
        ids.extend(store.add_workers(job_id, 2, replica))

    threads = [threading.Thread(target=add, args=(f"r{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # 8 from create_job, then 4 x 2 more, numbered on.
    assert sorted(ids) == sorted(f"{job_id}-{i}" for i in range(WORKERS, WORKERS + 8))


def test_exactly_one_replica_takes_an_expired_leader_lease(store: Store) -> None:
    cluster = Cluster(store)
    assert cluster.take_leadership("a", lease_s=30)
    assert not cluster.take_leadership("b", lease_s=30)
    assert cluster.take_leadership("a", lease_s=30)  # renewal
    assert cluster.leader() == "a"
    assert cluster.take_leadership("a", lease_s=-1)  # renewed into the past: it lapses
    assert cluster.leader() is None

    winners: list[str] = []
    start = threading.Barrier(6)

    def take(replica: str) -> None:
        start.wait()
        if cluster.take_leadership(replica, lease_s=30):
            winners.append(replica)

    threads = [threading.Thread(target=take, args=(f"r{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) == 1
    assert cluster.leader() == winners[0]
    cluster.resign(winners[0])
    assert cluster.leader() is None


def test_workers_of_a_gone_replica_are_lost_once_unheard_of(store: Store) -> None:
    cluster = Cluster(store)
    job_id = _job(store, 1)  # its 8 workers belong to replica r1
    cluster.register("r1", "http://a")
    cluster.register("r2", "http://b")
    assert cluster.lost_workers(replica_ttl_s=30, seen_ttl_s=-1) == []  # r1 is up
    # r1 is gone (not seen within a negative ttl); a worker that just heartbeated is not lost
    # unless it too has not been heard from.
    assert store.heartbeat(job_id, f"{job_id}-0", 30)
    assert cluster.lost_workers(replica_ttl_s=-1, seen_ttl_s=30) == []
    lost = cluster.lost_workers(replica_ttl_s=-1, seen_ttl_s=-1)
    assert [w.worker_id for w in lost] == sorted(f"{job_id}-{i}" for i in range(WORKERS))

    claims: list[bool] = []
    start = threading.Barrier(2)

    def claim() -> None:
        start.wait()
        claims.append(cluster.mark_lost(f"{job_id}-0", "gone"))

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(claims) == [False, True]  # of two leaders, one replaces it
    assert cluster.live_replicas(ttl_s=30) == ["r1", "r2"]


def test_server_processes_on_one_postgresql_never_share_a_batch(pg_url: str) -> None:
    # PostgreSQL only: one SQLite file is served by one server process.
    store = Store(pg_url)
    schema.upgrade(store)
    batches = 150
    job_id = _job(store, batches)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start = context.Barrier(3)
    procs = [
        context.Process(target=run_in_process, args=(store.url, job_id, f"p{i}", out, start))
        for i in range(3)
    ]
    for proc in procs:
        proc.start()
    reports = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)

    record = Record()
    for leased, hooks, errors in reports:
        assert errors == []
        record.leased.extend(leased)
        record.hooks.extend(hooks)
    _assert_each_attempt_leased_once(record, batches)
    assert len(record.hooks) == 1
    job = store.get_job(job_id)
    store.close()
    assert job is not None
    assert (job.status, job.succeeded) == (JobStatus.SUCCEEDED, batches)
