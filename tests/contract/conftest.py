"""The store contract suite runs against every engine: SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cortex.store import Store, schema, tables
from postgres import Databases


@pytest.fixture(scope="session")
def pg_store_url(pg_databases: Databases) -> str:
    """One migrated PostgreSQL database for the contract tests of this run."""
    url = pg_databases.create()
    store = Store(url)
    schema.upgrade(store)
    store.close()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'cortex.db'}")
        schema.upgrade(s)
    else:
        s = Store(request.getfixturevalue("pg_store_url"))
        with s.engine.begin() as conn:  # each test starts from empty tables
            names = ", ".join(table.name for table in tables.metadata.sorted_tables)
            conn.execute(sa.text(f"TRUNCATE {names}"))
    yield s
    s.close()
