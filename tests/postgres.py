"""Fresh PostgreSQL databases for one test run (CREATE DATABASE cortex_test_<run>_<n>), all
dropped when the run ends, so that runs side by side never share one.

The server is CORTEX_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/postgres). If
it cannot be reached, PostgreSQL tests are skipped with the reason, except under CI (the CI
variable is set), where they fail.
"""

from __future__ import annotations

import os
import uuid

import sqlalchemy as sa

from cortex.store import sql

ADMIN_URL = os.environ.get("CORTEX_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


class Databases:
    def __init__(self, admin_url: str = ADMIN_URL) -> None:
        self.admin_url = sa.make_url(sql.engine_url(admin_url))
        self.engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self.prefix = f"cortex_test_{uuid.uuid4().hex[:10]}"
        self.names: list[str] = []

    def check(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def create(self) -> str:
        """A new empty database; returns its URL as a user would write it."""
        name = f"{self.prefix}_{len(self.names)}"
        with self.engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        url = self.admin_url.set(drivername="postgresql", database=name)
        return url.render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.engine.connect() as conn:
            for name in self.names:
                # FORCE: a server a failed test left behind must not keep the database.
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()
