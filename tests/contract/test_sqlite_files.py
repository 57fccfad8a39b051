"""SQLite's files stay bounded: the write-ahead log under load, and the database after deletes
(incremental vacuum). PostgreSQL manages its own files."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from cortex.store import Store, schema
from cortex.store import tables as t
from cortex.store.engine import WAL_MAX_BYTES

API_SPEC = {"name": "api", "kind": "BatchAPI", "predictor": {"config": {}}}


def _sqlite(tmp_path: Path) -> tuple[Store, Path]:
    path = tmp_path / "cortex.db"
    store = Store(f"sqlite:///{path}")
    schema.upgrade(store)
    store.put_api("api", "spec1", API_SPEC, b"archive")
    return store, path


def _submit(store: Store, job_id: str, batches: int, payload: str) -> None:
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=1,
        config=None,
        timeout_s=None,
        max_attempts=1,
        worker_token="token",
        payloads=(payload for _ in range(batches)),
        replica_id="r1",
    )


def test_the_wal_stays_bounded_under_submissions_from_eight_threads_and_busy_readers(
    tmp_path: Path,
) -> None:
    """200 submissions of 2 MB each (400 MB through the log) from 8 threads, while 4 threads
    read status without pause, and the reconciler's PASSIVE checkpoint runs on its tick:
    overlapping readers kept SQLite from ever starting the log over (457 MB before)."""
    store, _ = _sqlite(tmp_path)
    payload = "[" + ",".join(['"' + "x" * 1000 + '"'] * 100) + "]"  # 100 kB
    stop = threading.Event()
    peak = 0
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as err:  # reported by the test, not lost in a thread
                errors.append(err)
                stop.set()

        return run

    def submitter(n: int) -> None:
        for i in range(25):
            _submit(store, f"job-{n}-{i}", 20, payload)

    def reader() -> None:
        while not stop.is_set():
            store.job_progress("job-0-0")
            with store.engine.connect() as conn:  # a longer read, as a listing makes
                conn.execute(sa.select(sa.func.count()).select_from(t.batches)).scalar()

    def ticker() -> None:
        while not stop.is_set():
            store.checkpoint()
            time.sleep(0.25)

    def sampler() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, store.wal_bytes())
            time.sleep(0.002)

    background = [threading.Thread(target=guarded(reader)) for _ in range(4)]
    background += [threading.Thread(target=guarded(ticker)), threading.Thread(target=sampler)]
    writers = [threading.Thread(target=guarded(lambda n=n: submitter(n))) for n in range(8)]
    for thread in background + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in background:
        thread.join()
    store.close()
    assert not errors, errors
    # Past the bound, the write that crossed it truncates the log: what can be over is that
    # one transaction (2 MB) and the writes of a checkpoint that had to wait for readers.
    assert peak < WAL_MAX_BYTES + (16 << 20), f"the WAL reached {peak / 1e6:.0f} MB"
    print(f"WAL peak {peak / 1e6:.1f} MB for 400 MB written")


def test_deleted_rows_give_their_space_back_to_the_file_system(tmp_path: Path) -> None:
    store, path = _sqlite(tmp_path)
    payload = '["' + os.urandom(50_000).hex() + '"]'  # 100 kB that do not compress
    for i in range(10):
        _submit(store, f"job{i}", 100, payload)  # 100 MB of payloads
    store.checkpoint()
    full = path.stat().st_size
    assert full > 90e6
    with store.write() as conn:
        conn.execute(t.batch_payloads.delete())

    freed = store.vacuum()
    store.checkpoint()

    assert freed > 80e6
    assert path.stat().st_size < full / 10, (full, path.stat().st_size)
    store.close()


def test_a_database_made_without_incremental_vacuum_is_converted_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sa.create_engine(f"sqlite:///{path}").connect() as conn:  # auto_vacuum NONE
        conn.exec_driver_sql("CREATE TABLE leftover (x INTEGER)")
    store = Store(f"sqlite:///{path}")
    try:
        schema.upgrade(store)
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # INCREMENTAL
        assert store.use_incremental_vacuum() is False  # once only
    finally:
        store.close()
