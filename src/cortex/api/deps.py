"""Request dependencies shared by the routers."""

from __future__ import annotations

from fastapi import Request

from cortex.service import Service


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")
