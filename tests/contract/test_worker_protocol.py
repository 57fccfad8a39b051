"""The worker protocol, with the real worker (`cortex.worker.runtime.run`: state reports,
heartbeats, the predictor loaded from its file, the loop, the hook) on the store through its
store adapter, on both engines.

Each request kind, and each answer kind, is lost in turn, as a proxy that closes the connection
would lose it: the worker sends the request again with the same number, and the job ends with
exact counts, every batch predicted once (a failing one once per attempt) and the hook run once.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from cortex.jobs import JobStatus, WorkerState
from cortex.store import Store
from cortex.store import tables as t
from cortex.store.workerqueue import StoreQueue
from cortex.worker import queue, runtime
from faultproxy import Fault

PREDICTOR = """
import json
import time
from pathlib import Path


class PythonPredictor:
    def __init__(self, config, job_spec):
        self.out = Path(config["out"])

    def predict(self, payload, batch_id):
        with open(self.out / "attempts.log", "a") as log:
            log.write(batch_id + "\\n")
        time.sleep(0.02)  # long enough for heartbeats to be sent while the job runs
        if payload == ["fail"]:
            raise ValueError("this batch always fails")
        return [item * 10 for item in payload]

    def on_job_complete(self, job_summary):
        with open(self.out / "hook.log", "a") as log:
            log.write("hook\\n")
        (self.out / "summary.json").write_text(json.dumps(job_summary))
"""
API_SPEC: dict[str, Any] = {
    "name": "api",
    "kind": "BatchAPI",
    "predictor": {"type": "python", "path": "predictor.py", "config": {}},
}
BATCHES = 12  # the last one fails on each of its 2 attempts
WORKERS = 2


class LossyQueue(StoreQueue):
    """A worker's store adapter with a bad connection: as if the request never reached the
    server, or its answer never came back (the server acted on it)."""

    def __init__(self, *args: Any, fault: Fault | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fault = fault

    def _send(self, op: str, body: dict[str, Any] | None) -> Any:
        fault = self.fault
        if fault is not None and fault.strikes(op, body):
            raise queue.Unavailable(f"the {op} request was lost")
        answer = super()._send(op, body)
        if fault is not None and fault.strikes(op, body, answer):
            raise queue.Unavailable(f"the answer to the {op} request was lost")
        return answer


def _job(store: Store, out: Path, job_id: str = "job1") -> str:
    if store.get_api("api") is None:
        store.put_api("api", "spec1", API_SPEC, b"archive")
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=WORKERS,
        config=None,
        timeout_s=None,
        max_attempts=2,
        worker_token="token",
        payloads=[*(f"[{i}]" for i in range(BATCHES - 1)), '["fail"]'],
        replica_id="r1",
    )
    out.mkdir(parents=True, exist_ok=True)
    return job_id


def _info(job_id: str, out: Path) -> dict[str, Any]:
    """What the worker API's spec read answers, for this test's API."""
    return {
        "job_spec": {"job_id": job_id, "api_name": "api", "workers": WORKERS},
        "api_spec": API_SPEC,
        "config": {"out": str(out)},
        "models": [],
        "heartbeat_s": 0.02,
        "lease_s": 5.0,
    }


def _run_workers(store: Store, job_id: str, tmp_path: Path, fault: Fault | None) -> list[Any]:
    """The job's workers, each the real worker in a thread of its own; their exit codes (or
    what they raised)."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "predictor.py").write_text(PREDICTOR)
    info = _info(job_id, tmp_path / "out")
    codes: list[Any] = [None] * WORKERS

    def worker(index: int) -> None:
        lossy = LossyQueue(store, job_id, f"{job_id}-{index}", info, fault=fault, lease_s=5.0)
        try:
            codes[index] = runtime.run(lossy, project)
        except BaseException as err:
            codes[index] = err

    # Daemons: a worker that never ends (polling for ever) fails the test, not the run.
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a worker never finished"
    return codes


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


FAULTS = [
    Fault(kind, where)
    for kind, where in [
        ("state", "request"),
        ("state", "answer"),
        ("spec", "request"),
        ("spec", "answer"),
        ("heartbeat", "request"),
        ("heartbeat", "answer"),
        ("lease", "request"),
        ("lease", "answer"),
        ("results", "request"),
        ("results", "answer"),
        ("hook-claim", "answer"),
        ("hook", "request"),
        ("hook", "answer"),
    ]
]


@pytest.mark.parametrize("fault", [None, *FAULTS], ids=lambda f: f and f"{f.kind}-{f.where}")
def test_a_lost_request_or_answer_changes_nothing(
    store: Store, tmp_path: Path, fault: Fault | None
) -> None:
    job_id = _job(store, tmp_path / "out")
    fault = None if fault is None else dataclasses.replace(fault, lock=threading.Lock())

    codes = _run_workers(store, job_id, tmp_path, fault)

    assert codes == [runtime.EXIT_OK] * WORKERS
    if fault is not None:
        assert fault.struck == fault.times, "the fault never struck: the test tested nothing"
    job = store.get_job(job_id)
    assert job is not None
    assert (job.status, job.succeeded, job.failed) == (
        JobStatus.COMPLETED_WITH_FAILURES,
        BATCHES - 1,
        1,
    )
    assert store.batch_counts(job_id) == {
        "queued": 0,
        "leased": 0,
        "succeeded": BATCHES - 1,
        "failed": 1,
    }
    # Every batch was predicted once, the failing one once per attempt: no batch was leased
    # again, or to two workers, because an answer was lost.
    attempts = _lines(tmp_path / "out" / "attempts.log")
    assert len(attempts) == BATCHES + 1 and len(set(attempts)) == BATCHES
    assert _lines(tmp_path / "out" / "hook.log") == ["hook"]
    # What predict returned is kept once per batch, written with the batch's success.
    results = [json.loads(line) for page in store.result_pages(job_id) for line in page.split()]
    assert [(r["index"], r["result"]) for r in results] == [(0, i * 10) for i in range(BATCHES - 1)]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["succeeded"], summary["failed"], summary["total"]) == (BATCHES - 1, 1, BATCHES)
    assert summary["job_id"] == job_id and summary["any_failed"] is True
    # Each worker was told its work was over: an exit now is a clean one, whatever its code.
    workers = [f"{job_id}-{i}" for i in range(WORKERS)]
    assert all(store.worker_finished(worker) for worker in workers)
    assert {w.state for w in store.list_workers(job_id)} == {WorkerState.RUNNING}


@pytest.mark.parametrize("where", ["request", "answer"])
def test_a_log_shipment_sent_again_is_stored_once(store: Store, tmp_path: Path, where: str) -> None:
    job_id = _job(store, tmp_path / "out")
    fault = Fault("logs", where)
    lossy = LossyQueue(store, job_id, f"{job_id}-0", {}, fault=fault)
    for n in range(4):
        lossy.ship_logs([[1.0 + n, "stdout", None, None, f"line {n}\nmore {n}"]], dropped=n % 2)

    assert fault.struck == 2
    with store.engine.connect() as conn:
        chunks = conn.execute(t.log_chunks.select().where(t.log_chunks.c.job_id == job_id)).all()
    # Four shipments, each one chunk: its lines and, where it said some were dropped, a
    # warning that says how many.
    assert [chunk.line_count for chunk in chunks] == [2, 3, 2, 3]


def test_a_copy_of_a_request_that_arrives_after_the_next_one_is_refused(
    store: Store, tmp_path: Path
) -> None:
    job_id = _job(store, tmp_path / "out")
    worker = f"{job_id}-0"
    first = store.lease(job_id, worker, [], 1, 30, seq=10)
    again = store.lease(job_id, worker, [], 1, 30, seq=10)  # a copy: the same answer
    assert [b.batch_id for b in again.batches] == [b.batch_id for b in first.batches]
    assert again.batches[0].payload == first.batches[0].payload
    store.lease(job_id, worker, [], 1, 30, seq=11)
    lossy = LossyQueue(store, job_id, worker, {}, fault=None)
    with pytest.raises(queue.Refused) as refused:
        lossy._send("lease", {"worker_id": worker, "results": [], "max_batches": 1, "seq": 10})
    assert (refused.value.status, refused.value.kind) == (409, "worker.stale_request")
    # One number is one request: a hook report under a lease's number is refused too.
    with pytest.raises(queue.Refused):
        lossy._send("hook", {"error": None, "traceback": None, "seq": 11})


def test_only_a_job_that_is_gone_stops_a_worker_quietly(store: Store, tmp_path: Path) -> None:
    job_id = _job(store, tmp_path / "out")
    lossy = LossyQueue(store, job_id, f"{job_id}-0", _info(job_id, tmp_path), fault=None)
    assert lossy.lease([], 1)["batches"]
    store.set_status(job_id, JobStatus.STOPPED)
    store.delete_api("api")
    with pytest.raises(queue.JobGone):
        lossy.lease([], 1)
    with pytest.raises(queue.JobGone):
        runtime.run(lossy, tmp_path)


def test_a_late_report_never_revives_an_ended_worker(store: Store, tmp_path: Path) -> None:
    job_id = _job(store, tmp_path / "out")
    worker = f"{job_id}-0"
    assert store.end_worker(worker, WorkerState.UNKNOWN, error_message="lost") is not None
    assert store.end_worker(worker, WorkerState.FAILED, exit_code=1) is None  # the first end wins
    store.report_state(job_id, worker, WorkerState.RUNNING, seq=1, has_hook=True)
    assert not store.update_worker(worker, WorkerState.INITIALIZING, pid=7)
    [row] = [w for w in store.list_workers(job_id) if w.worker_id == worker]
    assert (row.state, row.exit_code, row.pid) == (WorkerState.UNKNOWN, None, None)
    # Its report still told the job what the predictor has.
    job = store.get_job(job_id)
    assert job is not None and job.has_hook is True
