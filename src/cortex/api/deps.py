"""Request dependencies shared by the routers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from cortex.service import Service

# The dependencies are coroutines: FastAPI runs a plain function dependency in the thread pool,
# two thread hand-offs per request for what is an attribute lookup.


async def service(conn: HTTPConnection) -> Service:
    """The service, for an HTTP request or a websocket."""
    svc: Service = conn.app.state.service
    return svc


async def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


T = TypeVar("T")


async def read(service: Service, fn: Callable[[], T]) -> T:
    """Run a short store read for a hot route.

    On SQLite it runs inline on the event loop: the store is a local file whose readers never
    wait for writers (WAL), a status read takes a fraction of a millisecond, and the thread
    pool's two hand-offs cost more than that on a busy server. On PostgreSQL (a network round
    trip) it goes to the thread pool like any other store call.
    """
    if service.reads_inline:
        return fn()
    return await run_in_threadpool(fn)
