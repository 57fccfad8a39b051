"""The database under the store: its engine for a store URL, SQLite's settings, the write and
read transactions every part of the store runs in, and the few statements whose SQL differs by
dialect.

On SQLite every write transaction runs under one process-wide lock, because SQLite has one
writer anyway and waiting on a Python lock is cheaper than retrying on `database is locked`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from sqlalchemy.engine import Connection

from cortex import errors


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

    def close(self) -> None:
        self.engine.dispose()

    def checkpoint(self) -> None:
        """Copy the SQLite write-ahead log into the database (PASSIVE: it waits for no reader
        or writer, and copies what it can). Nothing to do on PostgreSQL."""
        if self.is_sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # Big pages for a new database (an existing one keeps its own): a batch's payload is often
    # tens or hundreds of kilobytes, and 64 KiB pages write a 44 MB submission 3x faster
    # than 4 KiB ones and halve the pages a lease reads and a checkpoint copies.
    cursor.execute("PRAGMA page_size=65536")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    # No checkpoint inside a commit: a lease must not pay for copying the megabytes a big
    # submission wrote. `Store.checkpoint` runs from the reconciler's thread instead.
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def insert_ignore(conn: Connection, table: sa.Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: waits for a concurrent insert of the same key, then
    inserts nothing (rowcount 0) instead of failing."""
    dialect = sa.dialects.postgresql if conn.dialect.name == "postgresql" else sa.dialects.sqlite
    # An INSERT's rowcount is only kept when asked for.
    return dialect.insert(table).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
