"""Alembic's entry point for the store's migrations; `cortex.store.schema` runs it."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from cortex.store import sql, tables

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=tables.metadata,
        # SQLite alters a table by copying it; batch mode does that for every ALTER.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("the store's migrations run against a database, not as SQL text")
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Run by the `alembic` command itself (for writing a new migration): -x url=...
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///path/to/cortex.db ...")
    engine = sa.create_engine(sql.engine_url(url))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()


main()
