"""Shared fixtures: one real `cortex serve` for the session, and a client for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cortex.client import Client
from helpers import Server, start_server, stop_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with server.client() as c:
        yield c
