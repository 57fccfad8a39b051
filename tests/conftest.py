"""Shared fixtures: one real `cortex serve` for the session, a client for it, and fresh
PostgreSQL databases for the tests that run on PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from cortex.client import Client
from cortex.store import Store, schema
from helpers import Server, start_server, stop_server
from postgres import ADMIN_URL, Databases
from s3server import S3, run_moto


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    """The shared server: on SQLite, or with CORTEX_TEST_SERVER_STORE=postgresql on a fresh
    PostgreSQL database (to run the integration and fault suites on that engine too)."""
    env = {}
    if os.environ.get("CORTEX_TEST_SERVER_STORE") == "postgresql":
        databases: Databases = request.getfixturevalue("pg_databases")
        store = Store(databases.create())
        schema.upgrade(store)
        store.close()
        env["CORTEX_STORE"] = store.url
    srv = start_server(tmp_path_factory.mktemp("server"), **env)
    yield srv
    stop_server(srv)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[Databases]:
    databases = Databases()
    try:
        databases.check()
    except sa.exc.OperationalError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL} (set CORTEX_TEST_POSTGRES): {err}")
    yield databases
    databases.drop_all()


@pytest.fixture
def pg_url(pg_databases: Databases) -> str:
    """The URL of a new, empty PostgreSQL database for this test."""
    return pg_databases.create()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """moto's standalone S3 server on loopback, for one test module."""
    yield from run_moto(tmp_path_factory)
