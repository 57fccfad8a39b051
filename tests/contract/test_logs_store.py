"""Job logs in the store: chunks, filters, tail, retention."""

from __future__ import annotations

import threading
import time
import tracemalloc

import sqlalchemy as sa

from cortex.jobs import JobStatus
from cortex.store import Store
from cortex.store import tables as t
from cortex.store.logs import PAGE_LINES, Cursor, LogFilter, LogLine, LogStore, in_time_order

EVERYTHING = LogFilter()


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


def _messages(logs: LogStore, job_id: str, where: LogFilter = EVERYTHING) -> list[str]:
    return [line.message for line in logs.lines(job_id, where)]


def test_lines_come_back_in_order_with_filters(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    logs.append("job1", "job1-0", _lines(0, 3, batch="b1"))
    logs.append("job1", "job1-1", _lines(3, 3))
    logs.server_line("job1", "hello")

    cursor = Cursor()
    lines = [line for page in logs.pages("job1", cursor) for line in page]
    assert [line.message for line in lines] == [f"line {i}" for i in range(6)] + ["hello"]
    assert cursor.after == lines[-1].chunk_id
    assert list(logs.pages("job1", cursor)) == []  # a follower goes on from there
    only = _messages(logs, "job1", LogFilter(source="job1-1"))
    assert only == ["line 3", "line 4", "line 5"]
    batch = list(logs.lines("job1", LogFilter(batch_id="b1")))
    assert {line.batch_id for line in batch} == {"b1"} and len(batch) == 3
    later = _messages(logs, "job1", LogFilter(since_ts=lines[4].ts))
    assert later == ["line 4", "line 5", "hello"]


def _tail(logs: LogStore, count: int, where: LogFilter = EVERYTHING) -> list[str]:
    cursor = logs.tail_cursor("job1", count, where)
    return [line.message for page in logs.pages("job1", cursor, where) for line in page]


def test_tail_walks_back_across_chunks(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    for start in range(0, 100, 10):
        logs.append("job1", "job1-0", _lines(start, 10, batch="odd" if start % 20 else "even"))
    assert _tail(logs, 25) == [f"line {i}" for i in range(75, 100)]
    assert _tail(logs, 0) == []
    assert len(_tail(logs, 1000)) == 100
    # Lines filtered one by one are counted one by one.
    assert _tail(logs, 15, LogFilter(batch_id="even")) == [
        f"line {i}" for i in [*range(65, 70), *range(80, 90)]
    ]


def test_entries_of_many_lines_split_and_keep_their_fields(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    logs.append("job1", "job1-0", [[1.0, "stdout", None, "b1", "a\nb\n\nc"]])
    lines = list(logs.lines("job1"))
    assert [line.message for line in lines] == ["a", "b", "", "c"]
    assert {(line.ts, line.batch_id, line.source) for line in lines} == {(1.0, "b1", "job1-0")}
    assert _tail(logs, 2) == ["", "c"]


def test_one_chunk_of_many_lines_is_read_a_page_at_a_time(store: Store) -> None:
    """One entry of 200,000 lines was 200,000 line objects at once (three million took the
    server to 1.6 GB): now one page at a time, whatever the chunk."""
    _job(store)
    logs = LogStore(store)
    logs.append("job1", "job1-0", [[1.0, "stdout", None, None, "\n".join(["ab"] * 200_000)]])
    tracemalloc.start()
    try:
        pages = 0
        count = 0
        for page in logs.pages("job1", Cursor()):
            assert len(page) <= PAGE_LINES
            pages += 1
            count += len(page)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000 and pages >= 200_000 // PAGE_LINES
    # The chunk's JSON (0.8 MB) and its text, a slice of split lines, a page (all of it at
    # once would be over 50 MB).
    assert peak < 15e6, f"reading held {peak / 1e6:.0f} MB"
    assert _tail(logs, 3) == ["ab"] * 3


def test_chunks_are_stored_compressed(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    logs.append("job1", "job1-0", _lines(0, 2000))
    with store.engine.connect() as conn:
        packed, raw_bytes = conn.execute(
            sa.select(t.log_chunks.c.packed, t.log_chunks.c.raw_bytes)
        ).one()
    assert len(packed) * 4 < raw_bytes


def test_a_jobs_log_stops_at_its_budget_and_counts_what_it_drops(store: Store) -> None:
    _job(store)
    logs = LogStore(store, max_bytes=20_000)
    for start in range(0, 2000, 100):  # about 60 kB of lines
        logs.append("job1", "job1-0", _lines(start, 100))
    logs.server_line("job1", "job status: status_succeeded")  # the server's lines still go in

    totals = logs.totals("job1")
    stored = list(logs.lines("job1"))
    notices = [line for line in stored if "reached its budget of 20000 bytes" in line.message]
    worker_lines = [line.message for line in stored if line.source == "job1-0"]
    assert len(notices) == 1 and stored[-1].message == "job status: status_succeeded"
    # Whole lines, from the first on, until the budget: the rest dropped and counted.
    assert worker_lines == [f"line {i}" for i in range(len(worker_lines))]
    assert 200 < len(worker_lines) < 2000
    assert totals.dropped_lines == 2000 - len(worker_lines)
    assert totals.stored_bytes <= 20_000 + 1000  # the server's own lines are not budgeted
    dropped = logs.dropped_line("job1")
    assert dropped is not None and f"{totals.dropped_lines} log lines" in dropped.message


def test_an_entry_is_cut_at_a_line_break_when_the_budget_ends_inside_it(store: Store) -> None:
    _job(store)
    logs = LogStore(store, max_bytes=1000)
    text = "\n".join(f"row {i:04d}" for i in range(1000))  # 9 kB in one entry
    assert logs.append("job1", "job1-0", [[1.0, "stdout", None, None, text]]) == 1
    kept = [line.message for line in logs.lines("job1") if line.source == "job1-0"]
    assert kept == [f"row {i:04d}" for i in range(len(kept))] and 50 < len(kept) < 1000
    assert logs.totals("job1").dropped_lines == 1000 - len(kept)


def test_appends_racing_for_the_last_of_a_budget_stay_within_it(store: Store) -> None:
    _job(store)
    logs = LogStore(store, max_bytes=50_000)

    def ship(worker: int) -> None:
        for start in range(0, 1000, 50):
            logs.append("job1", f"job1-{worker}", _lines(start, 50))

    threads = [threading.Thread(target=ship, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    totals = logs.totals("job1")
    kept = sum(1 for line in logs.lines("job1") if line.source != "server")
    assert totals.stored_bytes <= 50_000 + 1000
    assert kept + totals.dropped_lines == 4000


def test_retention_prunes_old_jobs_and_oversized_logs(store: Store) -> None:
    _job(store, "old")
    _job(store, "big")
    logs = LogStore(store)
    logs.append("old", "old-0", _lines(0, 5))
    store.set_status("old", JobStatus.STOPPED)
    for start in range(0, 50, 10):
        logs.append("big", "big-0", _lines(start, 10))

    logs.prune(ended_before_ts=time.time() + 1, max_lines_per_job=25)

    assert _messages(logs, "old") == []
    assert logs.totals("old").stored_bytes == 0
    kept = _messages(logs, "big")
    # Whole chunks go, oldest first, until at most 25 lines are left.
    assert kept == [f"line {i}" for i in range(30, 50)]


def test_deleting_an_api_deletes_its_jobs_logs(store: Store) -> None:
    _job(store)
    logs = LogStore(store)
    logs.append("job1", "job1-0", _lines(0, 3))
    store.delete_api("api")
    assert _messages(logs, "job1") == []
    assert logs.totals("job1").stored_bytes == 0


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
    pages = list(logs.read_by_time("job1", page_lines=3))
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


def test_a_tail_read_in_arrival_order_is_put_in_time_order_within_a_window() -> None:
    lines = [
        LogLine(n, ts, "w", "stdout", None, None, str(ts)) for n, ts in enumerate([3, 1, 2, 5, 4])
    ]
    pages = iter([lines[:2], lines[2:]])
    assert [line.ts for page in in_time_order(pages) for line in page] == [1, 2, 3, 4, 5]
    # A window of two: bounded, and ordered as far as it reaches.
    narrow = [line.ts for page in in_time_order(iter([lines]), max_held_lines=2) for line in page]
    assert sorted(narrow) == [1, 2, 3, 4, 5] and narrow[:2] == [1, 2]
