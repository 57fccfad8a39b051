"""Migrations checked against the model: all of them applied give exactly `tables.py`, on both
engines; an old unversioned database is upgraded; a server refuses a store not at head."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cortex import errors
from cortex.store import Store, schema, tables
from cortex.store.logs import LogStore
from postgres import Databases


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Makes URLs of new, empty databases of one engine."""
    if request.param == "sqlite":
        names = iter(range(100))
        yield lambda: f"sqlite:///{tmp_path / f'db{next(names)}.sqlite'}"
    else:
        databases: Databases = request.getfixturevalue("pg_databases")
        yield databases.create


def _shape(store: Store) -> dict[str, Any]:
    """Tables, columns (type, nullability), primary keys, unique constraints and indexes."""
    with store.engine.connect() as conn:
        inspector = sa.inspect(conn)
        shape = {}
        for name in sorted(inspector.get_table_names()):
            if name == "alembic_version":
                continue
            shape[name] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)
                ],
                "pk": inspector.get_pk_constraint(name)["constrained_columns"],
                "unique": sorted(
                    tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)
                ),
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(name)
                ),
            }
    return shape


def test_all_migrations_applied_equal_the_tables(new_url: Any) -> None:
    migrated = Store(new_url())
    created = Store(new_url())
    try:
        assert schema.upgrade(migrated).after == schema.head()
        tables.metadata.create_all(created.engine)
        with migrated.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, tables.metadata) == []
        assert _shape(migrated) == _shape(created)
    finally:
        migrated.close()
        created.close()


def test_a_database_made_before_migrations_is_stamped_and_upgraded(new_url: Any) -> None:
    store = Store(new_url())
    try:
        # What create_all made before there were migrations: the first revision's tables,
        # with no alembic_version.
        with store.engine.begin() as conn:
            command.upgrade(schema.config(conn), schema.INITIAL)
            conn.execute(sa.text("DROP TABLE alembic_version"))
            conn.execute(
                sa.text(
                    "INSERT INTO apis (name, spec_id, created_at, updated_at) "
                    "VALUES ('kept', 's', 1, 1)"
                )
            )
        done = schema.upgrade(store)
        assert (done.before, done.after) == (schema.INITIAL, schema.head())
        schema.check(store)
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM apis")).scalar_one() == "kept"
    finally:
        store.close()


def test_migrations_go_down_to_nothing_and_up_again(new_url: Any) -> None:
    store = Store(new_url())
    try:
        schema.upgrade(store)
        with store.engine.begin() as conn:
            command.downgrade(schema.config(conn), "base")
        with store.engine.connect() as conn:
            assert sa.inspect(conn).get_table_names() == ["alembic_version"]
        assert schema.upgrade(store).before is None
        assert schema.upgrade(store).before == schema.head()  # a second run does nothing
    finally:
        store.close()


def test_a_store_not_at_head_is_refused_in_one_line(new_url: Any) -> None:
    store = Store(new_url())
    try:
        with pytest.raises(errors.SchemaNotCurrent) as refused:
            schema.check(store)
        message = refused.value.message
        assert "has no cortex schema" in message and "cortex migrate" in message
        assert "\n" not in message
        with store.engine.begin() as conn:
            command.upgrade(schema.config(conn), schema.INITIAL)
        with pytest.raises(errors.SchemaNotCurrent, match=f"revision {schema.INITIAL}"):
            schema.check(store)
        schema.upgrade(store)
        schema.check(store)
    finally:
        store.close()


def test_a_store_that_cannot_be_reached_is_one_line() -> None:
    store = Store("postgresql://nobody:secret@127.0.0.1:1/nothing")
    try:
        with pytest.raises(errors.StoreUnavailable) as away:
            schema.check(store)
        line = str(away.value)
        assert "cannot reach the store postgresql+psycopg://nobody:***@127.0.0.1:1" in line
        assert "secret" not in line
    finally:
        store.close()


def test_batches_written_before_0005_keep_their_payloads_both_ways(new_url: Any) -> None:
    """0005 moves payloads to a table of their own: a queued batch of an older store is
    leased with its payload after the upgrade, and a downgrade puts it back."""
    store = Store(new_url())
    try:
        with store.engine.begin() as conn:
            command.upgrade(schema.config(conn), "0004")
            conn.execute(
                sa.text(
                    "INSERT INTO apis (name, spec_id, created_at, updated_at) "
                    "VALUES ('api', 's', 1, 1)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (job_id, api_name, spec_id, status, workers, max_attempts,"
                    " start_time, total_batch_count, worker_token) "
                    "VALUES ('job1', 'api', 's', 'status_running', 1, 1, 1, 1, 'token')"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO batches (job_id, seq, batch_id, payload, state) "
                    "VALUES ('job1', 0, 'b0', '[1, 2, 3]', 'queued')"
                )
            )
        schema.upgrade(store)
        leased = store.lease("job1", "w1", [], 10, 30).batches
        assert [(b.batch_id, b.payload) for b in leased] == [("b0", b"[1, 2, 3]")]
        with store.engine.begin() as conn:
            command.downgrade(schema.config(conn), "0004")
            payload = conn.execute(sa.text("SELECT payload FROM batches")).scalar_one()
        assert payload == "[1, 2, 3]"
    finally:
        store.close()


def test_log_chunks_written_before_0009_are_compressed_and_counted_both_ways(
    new_url: Any,
) -> None:
    """0009 compresses the chunks already stored and counts them against their job's budget;
    a downgrade gives them back as text."""
    store = Store(new_url())
    lines = '[[1.5, "stdout", null, "b1", "one\\ntwo"]]'
    try:
        with store.engine.begin() as conn:
            command.upgrade(schema.config(conn), "0008")
            conn.execute(
                sa.text(
                    "INSERT INTO log_chunks (job_id, source, first_ts, last_ts, line_count, lines)"
                    " VALUES ('job1', 'job1-0', 1.5, 1.5, 2, :lines)"
                ),
                {"lines": lines},
            )
        schema.upgrade(store)
        logs = LogStore(store)
        read = [(line.message, line.batch_id) for line in logs.lines("job1")]
        assert read == [("one", "b1"), ("two", "b1")]
        assert logs.totals("job1").stored_bytes == len(lines)
        with store.engine.begin() as conn:
            command.downgrade(schema.config(conn), "0008")
            assert conn.execute(sa.text("SELECT lines FROM log_chunks")).scalar_one() == lines
    finally:
        store.close()


def test_the_lease_index_holds_leased_batches_only(new_url: Any) -> None:
    """0013: queued batches, written by the million, are not in the lease-expiry index, and
    the reconciler's sweep over expired leases goes through it."""
    store = Store(new_url())
    try:
        schema.upgrade(store)
        with store.engine.connect() as conn:
            (index,) = [
                i
                for i in sa.inspect(conn).get_indexes("batches")
                if i["name"] == "ix_batches_lease"
            ]
            where = index["dialect_options"][f"{conn.dialect.name}_where"]
            assert "leased" in str(where)
            if conn.dialect.name == "sqlite":
                plan = conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT batches.job_id FROM batches "
                    "WHERE batches.state = 'leased' AND batches.lease_expires_at < 1.0"
                ).all()
                assert "ix_batches_lease" in str(plan)
    finally:
        store.close()
