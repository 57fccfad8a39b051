"""The database under the store: its engine for a store URL, SQLite's settings, the write and
read transactions every part of the store runs in, and the few statements whose SQL differs by
dialect.

On SQLite every write transaction runs under one process-wide lock, because SQLite has one
writer anyway and waiting on a Python lock is cheaper than retrying on `database is locked`.

SQLite's files are kept bounded: the write-ahead log is checkpointed and truncated once it
passes `WAL_MAX_BYTES`, and pages that deletes free are given back to the file system by
`vacuum` (the database is in incremental auto-vacuum mode).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from sqlalchemy.engine import Connection

from cortex import errors
from cortex.store import tokens

log = logging.getLogger("cortex.server")

# The write-ahead log is truncated once a write leaves it bigger than this: without it, readers
# that always overlap keep SQLite from ever starting it over, and it grew to 457 MB under 200
# submissions from 8 threads. The writer that meets the bound copies the log into the database
# holding the write lock, so it is well above what the reconciler's checkpoints leave between
# them (a 1M-item submission writes 16 MB of log: at 64 MB, back-to-back ones met it).
WAL_MAX_BYTES = 128 << 20
# How long a truncating checkpoint waits for readers still on the old log (it holds the write
# lock meanwhile), and how long after a checkpoint that could not finish the next one is tried.
_TRUNCATE_WAIT_MS = 500
_TRUNCATE_RETRY_S = 0.5
_BUSY_TIMEOUT_MS = 30000


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for a store URL: a plain `postgresql://` (or `postgres://`) URL, as
    users and tools write it, uses psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def error_reason(err: BaseException) -> str:
    """An error as one line fit for a job's status. A database error's text holds its SQL
    statement and parameters (a whole batch's payload, perhaps): only the database's own
    reason is kept."""
    if isinstance(err, sa.exc.StatementError):
        lines = str(err.orig if err.orig is not None else type(err).__name__).strip().splitlines()
        return f"the store failed: {lines[0] if lines else type(err.orig).__name__}"
    return str(err)


def display_url(url: str) -> str:
    """A store URL fit for logs and error messages: without its password."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


class BaseStore:
    """The engine and its transactions; each area of `sql.Store` builds on this."""

    def __init__(self, url: str) -> None:
        self.url = engine_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = sa.create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            self._write_lock: contextlib.AbstractContextManager[Any] = threading.RLock()
            database = sa.make_url(self.url).database
            self._wal_path = f"{database}-wal" if database and database != ":memory:" else None
        else:
            # READ COMMITTED is what the locking rules (in `sql`'s docstring) are written for;
            # set it rather than rely on the server's default. pre_ping: a PostgreSQL restart
            # costs no failed request.
            try:
                self.engine = sa.create_engine(
                    self.url,
                    pool_size=10,
                    max_overflow=20,
                    pool_pre_ping=True,
                    isolation_level="READ COMMITTED",
                )
            except ModuleNotFoundError as err:
                # psycopg is an extra: SQLite, the default, needs no driver.
                extra = " (pip install 'cortex-batch[postgres]')" if "psycopg" in str(err) else ""
                raise errors.StoreUnavailable(
                    f"the store {display_url(self.url)} needs the Python package "
                    f"{err.name or 'its driver'}, which is not installed{extra}"
                ) from None
            self._write_lock = contextlib.nullcontext()
            self._wal_path = None
        # Write transactions open on this thread (the SQLite lock is re-entrant): the log is
        # only truncated after the outermost one, never under an open transaction.
        self._depth = threading.local()
        self._truncate_after = 0.0
        # When this process last committed a write (monotonic): the reconciler copies the log
        # into the database while the store is quiet (`checkpoint`'s callers).
        self.last_write_at = 0.0
        # SQLite answers a checkpoint that meets another one BUSY at once, without waiting:
        # the reconciler's PASSIVE checkpoint and a truncating one take turns here instead.
        self._checkpoint_lock = threading.Lock()
        # Jobs' worker tokens, read once (`JobStore.worker_job`).
        self.worker_jobs = tokens.WorkerJobs()

    def close(self) -> None:
        self.engine.dispose()

    def checkpoint(self) -> None:
        """Copy the SQLite write-ahead log into the database (PASSIVE: it waits for no reader
        or writer, and copies what it can), and truncate the log if it passed its bound.
        Nothing to do on PostgreSQL."""
        if self.is_sqlite:
            with self._checkpoint_lock, self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            if self.wal_bytes() > WAL_MAX_BYTES:
                with self._write_lock:
                    self._truncate_wal()

    def wal_bytes(self) -> int:
        """The size of SQLite's write-ahead log file (0 on PostgreSQL)."""
        if self._wal_path is None:
            return 0
        try:
            return os.path.getsize(self._wal_path)
        except OSError:
            return 0

    def vacuum(self, step_pages: int = 256, max_steps: int = 256) -> int:
        """Give the pages that deletes freed back to the file system: SQLite's incremental
        vacuum, `step_pages` (64 KiB each) a write transaction, so that writers wait for one
        step at most. Returns the bytes freed. PostgreSQL's own autovacuum makes freed space
        reusable; returning it to the file system there is the operator's VACUUM FULL."""
        if not self.is_sqlite:
            return 0
        freed = 0
        for _ in range(max_steps):
            with self._write_lock:
                raw = self.engine.raw_connection()
                try:
                    db = raw.driver_connection
                    assert db is not None
                    page_bytes = db.execute("PRAGMA page_size").fetchone()[0]
                    before = db.execute("PRAGMA freelist_count").fetchone()[0]
                    if before == 0:
                        break
                    # executescript runs the pragma to its end: `execute` would step it once,
                    # and one step frees one page.
                    db.executescript(f"PRAGMA incremental_vacuum({step_pages})")
                    after = db.execute("PRAGMA freelist_count").fetchone()[0]
                finally:
                    raw.close()
                # The file shrinks when a checkpoint copies the step into it.
                self._bound_wal()
            freed += (before - after) * page_bytes
            if after == 0 or after >= before:
                break
        if freed:
            # Into the database file, which shrinks, and the log emptied: what the steps
            # wrote to it would otherwise stay on disk until the log starts over.
            with self._write_lock:
                self._truncate_wal()
        return freed

    def use_incremental_vacuum(self) -> bool:
        """Put a SQLite database into incremental auto-vacuum mode, once: a VACUUM, instant on
        a new database, minutes for gigabytes made before this mode existed. Returns whether
        it had to."""
        if not self.is_sqlite:
            return False
        with self._write_lock, self.engine.connect() as conn:
            if conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == _INCREMENTAL:
                return False
            log.info("rewriting the SQLite store once so that it can give freed space back")
            conn.exec_driver_sql(f"PRAGMA auto_vacuum={_INCREMENTAL}")
            conn.exec_driver_sql("VACUUM")
            return True

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed when the block ends (rolled back if it raises);
        nested writes on one thread share the outer transaction's lock."""
        with self._write_lock:
            depth = getattr(self._depth, "value", 0)
            self._depth.value = depth + 1
            try:
                with self.engine.begin() as conn:
                    yield conn
            finally:
                self._depth.value = depth
            if depth == 0:
                self.last_write_at = time.monotonic()
                self._bound_wal()

    def _bound_wal(self) -> None:
        """After a write (under the write lock): truncate the log if it passed its bound.
        Checkpoints on the reconciler's tick copy most of it already, so what is left to
        copy here is what was written since."""
        if self._wal_path is not None and self.wal_bytes() > WAL_MAX_BYTES:
            self._truncate_wal()

    def _truncate_wal(self) -> None:
        """A TRUNCATE checkpoint: copy the whole log into the database, wait (briefly) for
        readers still on it, and empty the file. Called under the write lock, so that no
        writer of this process waits on SQLite's lock meanwhile."""
        if time.monotonic() < self._truncate_after:
            return
        with self._checkpoint_lock, self.engine.connect() as conn:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={_TRUNCATE_WAIT_MS}")
            try:
                busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()[0]
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        if busy:  # a reader held on for the whole wait: try again a little later
            self._truncate_after = time.monotonic() + _TRUNCATE_RETRY_S

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (on SQLite, readers never wait for writers)."""
        with self.engine.connect() as conn:
            yield conn


_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # (Not `PRAGMA auto_vacuum` here: on a database already in that mode, setting it waits for
    # any open write transaction, and a read opened inside one would then wait for itself.
    # `use_incremental_vacuum` sets it once, after the migrations.)
    # Big pages for a new database (an existing one keeps its own): a batch's payload is often
    # tens or hundreds of kilobytes, and 64 KiB pages write a 44 MB submission 3x faster
    # than 4 KiB ones and halve the pages a lease reads and a checkpoint copies.
    cursor.execute("PRAGMA page_size=65536")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # SQLite's default page cache is 2,000 KiB: 31 of these 64 KiB pages, fewer than the
    # B-trees one write of batches touches (the table, its three indexes, the payloads), so
    # pages were dropped and read again within one insert. 16 MiB a connection, filled only
    # as pages are read: 10,000 batches written in 68-89 ms instead of 96-103 ms
    # (bench/store.py, alternating runs).
    cursor.execute("PRAGMA cache_size=-16384")
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Python's SQLite is built to overwrite deleted content (SECURE_DELETE): pruning a
    # gigabyte of logs would write a gigabyte of zeros through the log. FAST still clears
    # what is deleted inside pages it writes anyway; freed pages go back by `vacuum`.
    cursor.execute("PRAGMA secure_delete=FAST")
    # A log that SQLite starts over is cut back to this size (it does not shrink otherwise).
    cursor.execute(f"PRAGMA journal_size_limit={WAL_MAX_BYTES}")
    # No checkpoint inside a commit: a lease must not pay for copying the megabytes a big
    # submission wrote. `Store.checkpoint` runs from the reconciler's thread instead, and a
    # write pays only when the log passed WAL_MAX_BYTES (see `_bound_wal`).
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def insert_ignore(conn: Connection, table: sa.Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: waits for a concurrent insert of the same key, then
    inserts nothing (rowcount 0) instead of failing."""
    dialect = sa.dialects.postgresql if conn.dialect.name == "postgresql" else sa.dialects.sqlite
    # An INSERT's rowcount is only kept when asked for.
    return dialect.insert(table).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
