"""The store's schema: Alembic migrations shipped inside the package, applied or checked.

`cortex migrate` applies them. At start-up the server migrates its embedded SQLite store itself
(it is the store's only user), and checks that a shared PostgreSQL store is at the newest
revision, refusing to start otherwise: a schema change there is a deliberate step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from cortex import errors
from cortex.store import sql

MIGRATIONS = Path(__file__).parent / "migrations"
# The schema that `metadata.create_all` made before there were migrations.
INITIAL = "0001"
# Any number: the key of the advisory lock that keeps two `cortex migrate` runs apart.
_PG_LOCK_KEY = 0x636F72746578


@dataclasses.dataclass(frozen=True)
class Migration:
    before: str | None
    after: str


def config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None
    return revision


def current(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(store: sql.Store) -> Migration:
    """Apply every migration the store lacks, in one transaction; then put a SQLite store made
    before incremental vacuum into that mode (VACUUM runs outside any transaction)."""
    with _connection(store, begin=True) as conn:
        if conn.dialect.name == "postgresql":
            # DDL is transactional here; the lock makes a second runner wait, then find
            # nothing left to do.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
        before = current(conn)
        if before is None and sa.inspect(conn).has_table("jobs"):
            # Made by create_all before migrations existed: that schema is the first one.
            command.stamp(config(conn), INITIAL)
            before = INITIAL
        command.upgrade(config(conn), "head")
    store.use_incremental_vacuum()
    return Migration(before, head())


def check(store: sql.Store) -> None:
    """Raise `SchemaNotCurrent` unless the store is at the newest revision."""
    with _connection(store, begin=False) as conn:
        found = current(conn)
    wanted = head()
    if found == wanted:
        return
    where = sql.display_url(store.url)
    state = "has no cortex schema" if found is None else f"is at schema revision {found}"
    raise errors.SchemaNotCurrent(
        f"the store {where} {state}; this server needs revision {wanted}: "
        f"run `cortex migrate --store URL` with the same store URL, then start the server again"
    )


def prepare(store: sql.Store) -> None:
    """What the server does at start-up: migrate embedded SQLite, check anything else."""
    if store.is_sqlite:
        upgrade(store)
    else:
        check(store)


@contextlib.contextmanager
def _connection(store: sql.Store, *, begin: bool) -> Iterator[sa.Connection]:
    """A connection, or one readable line (not a driver traceback) if the store is away."""
    try:
        conn = store.engine.connect()
    except sa.exc.OperationalError as err:
        lines = str(err.orig or err).strip().splitlines()
        raise errors.StoreUnavailable(
            f"cannot reach the store {sql.display_url(store.url)}: {lines[0] if lines else err}"
        ) from err
    with conn:
        if not begin:
            yield conn
            return
        with conn.begin():
            yield conn
