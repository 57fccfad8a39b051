"""Who may call, then how much they may send: the gate every request passes before any route
reads a byte of its body.

1. Authentication. The public API needs the server's bearer token (when one is set); the
   worker API (`/worker/v1/jobs/<job id>/...`) needs that job's own token, checked here
   against the store, and the job is handed to the route. FastAPI reads a route's body before
   it runs the route's dependencies, so a check there would come after the body.
2. The body's size. A declared `Content-Length` over the route's limit is refused at once,
   unread; a body without one is cut off at the limit while it streams in.

Refusals are the usual `{"kind", "message"}` answers, and close the connection, so that what a
client is still sending is not read either.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cortex import errors
from cortex.api import deps
from cortex.project import MAX_ARCHIVE_BYTES
from cortex.settings import Settings

# Open without a token: load balancers probe readiness.
_OPEN_PATHS = frozenset({"/healthz"})
_WORKER_PATH = re.compile(r"^/worker/v1/jobs/([^/]+)/")
# Where the gate leaves the job a worker token was checked for (`api.worker` reads it).
WORKER_JOB = "cortex.worker_job"
# A deploy carries the project archive, and the API's spec beside it in the form.
_DEPLOY_PATH = "/deploy"
_DEPLOY_EXTRA_BYTES = 1 << 20


class Gate:
    """Pure ASGI middleware: authentication, then the body's size (see the module's doc)."""

    def __init__(
        self, app: ASGIApp, settings: Settings, open_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.expected = f"Bearer {settings.auth_token}".encode() if settings.auth_token else None
        self.max_body_bytes = settings.max_body_bytes
        # Exact paths only (the dashboard's static files): a prefix would open routes added later.
        self.open_paths = _OPEN_PATHS | open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        try:
            await self._authenticate(scope)
            if scope["type"] == "http":
                receive = self._limit(scope, receive)
        except errors.CortexError as err:
            await _reject(scope, send, err)
            return
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> None:
        path: str = scope["path"]
        if path in self.open_paths:
            return
        given = _header(scope, b"authorization")
        worker = _WORKER_PATH.match(path)
        if worker is not None:
            scope[WORKER_JOB] = await _worker_job(scope, worker.group(1), given)
            return
        if path.startswith("/worker/"):
            return  # no such route: the router answers 404, and reads nothing
        # compare_digest takes the same time wherever the first difference is.
        if self.expected is not None and not hmac.compare_digest(given, self.expected):
            raise errors.Unauthorized(
                "this server requires a token: send Authorization: Bearer <token> "
                "(the CLI reads it from CORTEX_AUTH_TOKEN)"
            )

    def _limit(self, scope: Scope, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        if scope["path"] == _DEPLOY_PATH:
            limit = MAX_ARCHIVE_BYTES + _DEPLOY_EXTRA_BYTES
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI passes it on from a body it is parsing (it
                    # turns anything else into "There was an error parsing the body"). The
                    # connection closes after the answer: the rest of the body is not read.
                    raise HTTPException(
                        413, _too_large(limit).message, headers={"connection": "close"}
                    )
            return message

        return limited


async def _worker_job(scope: Scope, job_id: str, given: bytes) -> Any:
    scheme, _, token = given.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise errors.Unauthorized("a worker token is required (Authorization: Bearer <token>)")
    workers = scope["app"].state.service.workers
    # The job's token is kept in memory once read: most requests read nothing. The first
    # reads it inline on SQLite, like the status route.
    job = workers.authorize_worker(job_id, token, read=False)
    if job is None:
        job = await deps.read(
            scope["app"].state.service, lambda: workers.authorize_worker(job_id, token)
        )
    return job


def _too_large(limit: int) -> errors.BodyTooLarge:
    return errors.BodyTooLarge(f"the request body is larger than the {limit} byte limit")


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


async def _reject(scope: Scope, send: Send, err: errors.CortexError) -> None:
    prefix = ""
    if scope["type"] == "websocket":
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            # A server that cannot answer a handshake with a response: a close before the
            # handshake is refused with a bare 403.
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        prefix = "websocket."  # the same answer, in place of the handshake
    body = json.dumps(err.to_dict()).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if err.status_code == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if not prefix:
        headers.append((b"connection", b"close"))  # the body still coming is not read
    await send(
        {"type": f"{prefix}http.response.start", "status": err.status_code, "headers": headers}
    )
    await send({"type": f"{prefix}http.response.body", "body": body})
