"""`create_app(settings)`: the FastAPI application, its lifespan and its error mapping."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import (
    RequestValidationError,
    ValidationException,
    WebSocketRequestValidationError,
)
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketState

from cortex import errors, launchers, replicas
from cortex.api import body, logs, metrics, public, results, ui, worker
from cortex.api.auth import Gate
from cortex.reconciler import Reconciler
from cortex.service import Service
from cortex.settings import Settings
from cortex.store import Store, schema
from cortex.store.cluster import Cluster

log = logging.getLogger("cortex.server")


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        replica_id = replicas.load_id(settings.data_dir)
        # Before the store is touched: a second server on this folder must change nothing.
        replicas.hold(
            settings.data_dir, settings.resolved_store_url, settings.listen_url, replica_id
        )
        store = Store(settings.resolved_store_url)
        schema.prepare(store)
        launcher = launchers.create(settings)
        service = Service(settings, store, launcher, replica_id)
        membership = replicas.Membership(
            Cluster(store), replica_id, settings.listen_url, settings.leader_lease_s
        )
        reconciler = Reconciler(service, membership)
        reconciler.start()
        service.deploys.resume_builds()
        app.state.service = service
        app.state.membership = membership
        log.info("cortex server ready at %s", settings.resolved_public_url)
        # What is loaded by now (modules, the app and its routes, the store's tables) lives as
        # long as the server: kept out of the garbage collector's full passes, which walked
        # all of it (140,000 objects) with every thread stopped, 100-130 ms a pass; one in
        # three W1 jobs had a lease wait 160 ms for one.
        gc.freeze()
        try:
            yield
        finally:
            reconciler.close()
            # Workers outlive a server restart on purpose (they retry and hold their leases);
            # only a deliberate shutdown of the whole service would stop them.
            store.close()
            replicas.release()

    app = FastAPI(
        title="Cortex Batch",
        summary="A self-hosted Batch API for ML inference",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics.Metrics(app.state)

    @app.exception_handler(errors.CortexError)
    async def cortex_error(conn: HTTPConnection, err: errors.CortexError) -> JSONResponse | None:
        return await _reply(conn, err.to_dict(), err.status_code)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(WebSocketRequestValidationError)
    async def validation_error(
        conn: HTTPConnection, err: ValidationException
    ) -> JSONResponse | None:
        message = body.validation_message(err.errors())
        return await _reply(conn, {"kind": errors.InvalidRequest.kind, "message": message}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {
            404: "request.not_found",
            405: "request.method_not_allowed",
            413: errors.BodyTooLarge.kind,  # a body cut off while it streamed in (`api.auth`)
        }.get(err.status_code, "request.invalid")
        return JSONResponse(
            {"kind": kind, "message": str(err.detail)},
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(
            {"kind": "internal.unexpected_error", "message": "the server hit an unexpected error"},
            status_code=500,
        )

    @app.get("/healthz", include_in_schema=False)
    def healthz(request: Request) -> dict[str, Any]:
        # Additive: which replica answered, and whether it leads (see docs/scale.md).
        membership: replicas.Membership = request.app.state.membership
        return {
            "status": "ok",
            "replica_id": membership.replica_id,
            "leader": membership.is_leader,
        }

    app.include_router(worker.router)
    app.include_router(logs.router)  # before public: /<api>/logs is not a job id
    app.include_router(results.router)
    app.include_router(metrics.router)  # before public: `ui` and `metrics` are not APIs
    app.include_router(ui.router)
    app.include_router(public.router)
    # Authentication, then the body's size, before any route reads a byte of the body.
    app.add_middleware(Gate, settings=settings, open_paths=ui.PUBLIC_PATHS)
    # Outermost (added last), so that a request refused for its token is timed too.
    app.add_middleware(metrics.RequestTimer, histogram=app.state.metrics.request_duration)
    return app


async def _reply(
    conn: HTTPConnection, body: dict[str, str], status_code: int
) -> JSONResponse | None:
    """An error as `{"kind", "message"}`.

    A websocket not yet accepted is refused with that same response in place of its handshake,
    as Cortex's operator refused one (its CLI prints the kind and message of a refused
    handshake). Once accepted, or where the server cannot send a response to a websocket, the
    socket closes with 1008 (1011 for a server error) and the message as its reason."""
    response = JSONResponse(body, status_code=status_code)
    if not isinstance(conn, WebSocket):
        return response
    state = conn.application_state
    if state == WebSocketState.CONNECTING and "websocket.http.response" in (
        conn.scope.get("extensions") or {}
    ):
        return response
    if state in (WebSocketState.CONNECTING, WebSocketState.CONNECTED):
        code = 1011 if status_code >= 500 else 1008
        await conn.close(code, _close_reason(body["message"]))
    return None


def _close_reason(message: str) -> str:
    """A close frame's reason holds at most 123 bytes of UTF-8."""
    return message.encode()[:123].decode(errors="ignore")
