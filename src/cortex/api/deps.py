"""Request dependencies shared by the routers."""

from __future__ import annotations

from fastapi import Request
from starlette.requests import HTTPConnection

from cortex.service import Service


def service(conn: HTTPConnection) -> Service:
    """The service, for an HTTP request or a websocket."""
    svc: Service = conn.app.state.service
    return svc


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")
