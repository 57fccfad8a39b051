"""Job logs in the store: chunks, filters, tail, retention."""

from __future__ import annotations

import time

from cortex.jobs import JobStatus
from cortex.store import Store
from cortex.store.logs import LogFilter, LogStore


def _job(store: Store, job_id: str = "job1") -> None:
    if store.get_api("api") is None:
        store.put_api("api", "s1", {"name": "api"}, b"a")
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=1,
        config=None,
        timeout_s=None,
        max_attempts=1,
        worker_token="t",
        payloads=iter(["[1]"]),
        replica_id="r1",
    )


def _lines(start: int, count: int, batch: str | None = None) -> list[list[object]]:
    past = time.time() - 1000  # written before anything the test does next
    return [[past + i, "stdout", None, batch, f"line {i}"] for i in range(start, start + count)]


def test_lines_come_back_in_order_with_filters(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    logs.append("job1", "job1-0", _lines(0, 3, batch="b1"))
    logs.append("job1", "job1-1", _lines(3, 3))
    logs.server_line("job1", "hello")

    lines, last, more = logs.read("job1", 0, 10)
    assert [line.message for line in lines] == [f"line {i}" for i in range(6)] + ["hello"]
    assert not more and last == lines[-1].chunk_id
    assert logs.read("job1", last, 10)[0] == []
    only = logs.read("job1", 0, 10, LogFilter(source="job1-1"))[0]
    assert [line.message for line in only] == ["line 3", "line 4", "line 5"]
    batch = logs.read("job1", 0, 10, LogFilter(batch_id="b1"))[0]
    assert {line.batch_id for line in batch} == {"b1"} and len(batch) == 3
    later = logs.read("job1", 0, 10, LogFilter(since_ts=lines[4].ts))[0]
    assert [line.message for line in later] == ["line 4", "line 5", "hello"]


def test_tail_walks_back_across_chunks(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    for start in range(0, 100, 10):
        logs.append("job1", "job1-0", _lines(start, 10))
    tail, newest = logs.tail("job1", 25)
    assert [line.message for line in tail] == [f"line {i}" for i in range(75, 100)]
    assert newest == tail[-1].chunk_id
    assert logs.tail("job1", 0)[0] == []
    assert len(logs.tail("job1", 1000)[0]) == 100


def test_retention_prunes_old_jobs_and_oversized_logs(store: Store) -> None:
    _job(store, "old")
    _job(store, "big")
    logs = LogStore(store)
    logs.append("old", "old-0", _lines(0, 5))
    store.set_status("old", JobStatus.STOPPED)
    for start in range(0, 50, 10):
        logs.append("big", "big-0", _lines(start, 10))

    logs.prune(ended_before_ts=time.time() + 1, max_lines_per_job=25)

    assert logs.read("old", 0, 10)[0] == []
    kept = [line.message for line in logs.read("big", 0, 100)[0]]
    # Whole chunks go, oldest first, until at most 25 lines are left.
    assert kept == [f"line {i}" for i in range(30, 50)]


def test_deleting_an_api_deletes_its_jobs_logs(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    logs.append("job1", "job1-0", _lines(0, 3))
    store.delete_api("api")
    assert logs.read("job1", 0, 10)[0] == []


def test_an_ended_jobs_log_reads_in_time_order_across_workers(store: Store) -> None:
    """Chunks arrive out of time order (each worker ships every 100 ms; the server writes
    its lines at once): read by time, every line comes once, in time order, a page at a
    time."""
    _job(store)
    logs = LogStore(store)
    t0 = 1_000_000.0
    arrivals = [  # (source, [ts...]) in arrival order
        ("job1-0", [t0 + 0.0, t0 + 0.3, t0 + 0.6]),
        ("server", [t0 + 0.9]),  # the final status, written before the last worker lines
        ("job1-1", [t0 + 0.1, t0 + 0.2, t0 + 0.8]),
        ("job1-0", [t0 + 0.7, t0 + 0.85]),
        ("job1-1", [t0 + 0.8]),  # a tie: arrival order
    ]
    for source, stamps in arrivals:
        logs.append("job1", source, [[ts, "stdout", None, None, f"{ts - t0:.2f}"] for ts in stamps])
    pages = list(logs.read_by_time("job1", page_chunks=2))
    assert len(pages) > 1  # paged, not read whole
    lines = [line for page in pages for line in page]
    assert [(line.message, line.source) for line in lines] == [
        ("0.00", "job1-0"),
        ("0.10", "job1-1"),
        ("0.20", "job1-1"),
        ("0.30", "job1-0"),
        ("0.60", "job1-0"),
        ("0.70", "job1-0"),
        ("0.80", "job1-1"),
        ("0.80", "job1-1"),
        ("0.85", "job1-0"),
        ("0.90", "server"),
    ]
    # Filters still apply.
    only = [
        line.message
        for page in logs.read_by_time("job1", LogFilter(source="job1-0", since_ts=t0 + 0.5))
        for line in page
    ]
    assert only == ["0.60", "0.70", "0.85"]
    # With less room than the overlap needs, every line still comes, once.
    bounded = [line for page in logs.read_by_time("job1", max_held_lines=1) for line in page]
    assert sorted(line.ts for line in bounded) == sorted(line.ts for line in lines)
