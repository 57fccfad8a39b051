"""Enqueuing a file dataset into the store, on every engine: chunks, the resume cursor,
leasing while enqueuing, and an owner that lost the job."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from cortex import enqueuer, scan
from cortex.jobs import JobStatus
from cortex.store import Job, Store
from cortex.store.records import BatchResult
from cortex.store.workerqueue import StoreQueue
from cortex.worker import ranges

API_SPEC: dict[str, Any] = {"name": "api", "kind": "BatchAPI", "predictor": {"config": {}}}


def _dataset_job(store: Store, folder: Path, batch_size: int, job_id: str = "job1") -> Job:
    if store.get_api("api") is None:
        store.put_api("api", "spec1", API_SPEC, b"archive")
    store.create_enqueuing_job(
        job_id=job_id,
        api_name="api",
        workers=1,
        config=None,
        timeout_s=None,
        max_attempts=2,
        worker_token="token",
        dataset={"kind": "delimited_files", "s3_paths": [f"{folder}/"], "batch_size": batch_size},
        replica_id="r1",
    )
    job = store.get_job(job_id)
    assert job is not None
    return job


def _write_lines(folder: Path, count: int, files: int = 3) -> list[int]:
    folder.mkdir(parents=True, exist_ok=True)
    per_file = count // files
    values = list(range(count))
    for f in range(files):
        chunk = values[f * per_file : (f + 1) * per_file if f < files - 1 else count]
        (folder / f"part-{f}.jsonl").write_text("".join(f"{v}\n" for v in chunk))
    return values


def _payloads(store: Store, job_id: str) -> list[list[Any]]:
    """Every batch's payload, leased as a worker does: reporting what it got each time, and
    reading the lines of a batch stored by reference."""
    found: list[list[Any]] = []
    results: list[BatchResult] = []
    while True:
        leased = store.lease(job_id, "w", results, 1000, 60).batches
        if not leased:
            return found
        found.extend(json.loads(ranges.stored_payload(b.payload)) for b in leased)
        results = [BatchResult(b.batch_id, True, 0.01) for b in leased]


def test_enqueue_writes_chunks_and_runs(store: Store, tmp_path: Path) -> None:
    values = _write_lines(tmp_path / "data", 2500)
    job = _dataset_job(store, tmp_path / "data", batch_size=1)
    assert job.status is JobStatus.ENQUEUING and job.total_batch_count == 0
    seen: list[int] = []
    done = enqueuer.run(
        store, job, (tmp_path,), "r1", on_chunk=lambda j: seen.append(j.total_batch_count)
    )
    assert done is not None
    assert done.status is JobStatus.RUNNING and done.enqueue_done
    assert done.total_batch_count == 2500 and done.enqueued_items == 2500
    # Written in chunks of at most CHUNK_BATCHES, the count growing with each.
    assert seen[-1] == 2500 and len(seen) >= 3 and seen == sorted(seen)
    assert [v for batch in _payloads(store, job.job_id) for v in batch] == values


def test_workers_lease_while_enqueuing_and_completion_waits(store: Store, tmp_path: Path) -> None:
    job = _dataset_job(store, tmp_path, batch_size=2)
    written = store.append_batches(job.job_id, ["[1,2]", "[3,4]"], 4, "r1")
    assert written is not None and written.total_batch_count == 2
    store.set_has_hook(job.job_id, False)
    lease = store.lease(job.job_id, "w", [], 10, 60)
    assert len(lease.batches) == 2
    results = [BatchResult(b.batch_id, True, 0.01) for b in lease.batches]
    after = store.lease(job.job_id, "w", results, 10, 60)
    # Every batch written so far is done, but more may come: not complete, not done.
    assert after.batches == [] and not after.done and after.final_status is None
    current = store.get_job(job.job_id)
    assert current is not None and current.status is JobStatus.ENQUEUING
    finished = store.finish_enqueue(job.job_id, "r1", "no data")
    assert finished is not None and finished.status is JobStatus.RUNNING
    final = store.lease(job.job_id, "w", [], 10, 60)
    assert final.done and final.final_status is JobStatus.SUCCEEDED


def test_resume_skips_what_was_written(store: Store, tmp_path: Path) -> None:
    values = _write_lines(tmp_path / "data", 1000, files=4)
    job = _dataset_job(store, tmp_path / "data", batch_size=7)
    # An earlier run wrote two chunks, then the server died.
    first = [json.dumps(values[i : i + 7]) for i in range(0, 70, 7)]
    store.append_batches(job.job_id, first[:5], 35, "r1")
    store.append_batches(job.job_id, first[5:], 35, "r1")
    resumed = store.get_job(job.job_id)
    assert resumed is not None and resumed.enqueued_items == 70
    done = enqueuer.run(store, resumed, (tmp_path,), "r1", on_chunk=lambda j: None)
    assert done is not None and done.status is JobStatus.RUNNING
    batches = _payloads(store, job.job_id)
    assert [v for batch in batches for v in batch] == values  # none missing, none twice
    assert all(len(b) == 7 for b in batches[:-1]) and len(batches[-1]) == 1000 % 7


def test_a_job_taken_over_or_stopped_refuses_the_old_writer(store: Store, tmp_path: Path) -> None:
    job = _dataset_job(store, tmp_path, batch_size=1)
    assert store.take_enqueue(job.job_id, "r1", "r2")
    assert not store.take_enqueue(job.job_id, "r1", "r3")  # compare-and-set
    assert store.append_batches(job.job_id, ["[1]"], 1, "r1") is None
    assert store.finish_enqueue(job.job_id, "r1", "no data") is None
    assert store.append_batches(job.job_id, ["[1]"], 1, "r2") is not None
    assert [j.job_id for j in store.unfinished_enqueues()] == [job.job_id]
    assert store.set_status(job.job_id, JobStatus.STOPPED)
    assert store.append_batches(job.job_id, ["[2]"], 1, "r2") is None
    assert store.unfinished_enqueues() == []


def test_no_data_fails_the_job(store: Store, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.jsonl").write_text("\n\n")
    job = _dataset_job(store, tmp_path / "data", batch_size=1)
    done = enqueuer.run(store, job, (tmp_path,), "r1", on_chunk=lambda j: None)
    assert done is not None and done.status is JobStatus.ENQUEUE_FAILED
    assert done.error_kind == "batchapi.no_data_found"
    assert done.error_message == enqueuer.NO_DATA


def _write_objects(folder: Path, count: int) -> list[dict[str, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    values = [{"n": n} for n in range(count)]
    (folder / "objects.jsonl").write_text("".join(json.dumps(v) + "\n" for v in values))
    return values


def test_resume_by_reference_skips_the_batches_written(store: Store, tmp_path: Path) -> None:
    """Lines that are objects are stored by reference: a resumed enqueue skips the whole
    batches written before and the rest follow, none missing, none twice."""
    values = _write_objects(tmp_path / "data", 1000)
    job = _dataset_job(store, tmp_path / "data", batch_size=7)
    _, dataset = enqueuer.file_dataset(job)
    first = list(itertools.islice(scan.reference_batches(dataset, (tmp_path,)), 10))
    assert all(ranges.is_ref(ref) for ref, _, _ in first)
    store.append_batches(job.job_id, [r for r, _, _ in first[:4]], 28, "r1")
    store.append_batches(job.job_id, [r for r, _, _ in first[4:]], 42, "r1")
    resumed = store.get_job(job.job_id)
    assert resumed is not None and resumed.enqueued_items == 70
    done = enqueuer.run(store, resumed, (tmp_path,), "r1", on_chunk=lambda j: None)
    assert done is not None and done.status is JobStatus.RUNNING
    batches = _payloads(store, job.job_id)
    assert [v for batch in batches for v in batch] == values
    assert [len(b) for b in batches] == [7] * 142 + [6]


def test_the_server_reads_for_a_worker_and_names_a_file_gone(store: Store, tmp_path: Path) -> None:
    """The worker protocol's `payload` request (the server reading a batch for a worker that
    cannot): the batch's payload, or an error that says neither could read it."""
    _write_objects(tmp_path / "data", 3)
    job = _dataset_job(store, tmp_path / "data", batch_size=2)
    enqueuer.run(store, job, (tmp_path,), "r1", on_chunk=lambda j: None)
    leased = store.lease(job.job_id, f"{job.job_id}-0", [], 10, 60).batches
    worker = StoreQueue(store, job.job_id, f"{job.job_id}-0", {})
    assert worker.payload(leased[0].batch_id) == {"payload": [{"n": 0}, {"n": 1}]}
    (tmp_path / "data" / "objects.jsonl").unlink()
    answer = worker.payload(leased[1].batch_id)
    assert "neither the worker nor the server can read it" in answer["error"]
    assert "objects.jsonl" in answer["error"]


def test_status_counts_from_the_counters_match_the_rows(store: Store, tmp_path: Path) -> None:
    """A status's batch counts come from the job's counters and its leased batches; at every
    step they are what counting the rows by state gives (while enqueuing, leased, retried,
    succeeded, failed)."""
    job = _dataset_job(store, tmp_path, batch_size=1)

    def same() -> dict[str, int]:
        progress = store.job_progress(job.job_id)
        assert progress is not None
        assert progress[1] == store.batch_counts(job.job_id)
        return progress[1]

    same()
    store.append_batches(job.job_id, [f"[{n}]" for n in range(10)], 10, "r1")
    assert same() == {"queued": 10, "leased": 0, "succeeded": 0, "failed": 0}
    first = store.lease(job.job_id, "w1", [], 4, 60).batches
    second = store.lease(job.job_id, "w2", [], 3, 60).batches
    assert same()["leased"] == 7
    results = [BatchResult(b.batch_id, True, 0.01) for b in first[:2]]
    results += [BatchResult(b.batch_id, False, 0.01, "boom") for b in first[2:]]
    store.lease(job.job_id, "w1", results, 0, 60)  # two succeed, two fail (one attempt left)
    same()
    store.release_worker_leases(job.job_id, "w2")  # w2 died: its batches are queued again
    same()
    while leased := store.lease(job.job_id, "w3", [], 10, 60).batches:
        store.lease(
            job.job_id, "w3", [BatchResult(b.batch_id, False, 0.0, "x") for b in leased], 0, 60
        )
        same()
    assert same()["failed"] > 0 and same()["queued"] == 0 and len(second) == 3
