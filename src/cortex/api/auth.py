"""Bearer-token authentication for the public API (the worker API has job-scoped tokens)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from cortex import errors

# Open without a token: load balancers probe readiness; workers bring their own job tokens.
_OPEN_PATHS = frozenset({"/healthz"})
_WORKER_PREFIX = "/worker/"


class BearerAuth:
    """Pure ASGI middleware: requests and websockets without the server's token get a 401 and
    go no further (a websocket is refused before its handshake)."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        # Exact paths only (the dashboard's static files): a prefix would open routes added later.
        self.open_paths = _OPEN_PATHS | open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in self.open_paths or path.startswith(_WORKER_PREFIX):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        # compare_digest takes the same time wherever the first difference is.
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        await _reject(scope, send)


async def _reject(scope: Scope, send: Send) -> None:
    prefix = ""
    if scope["type"] == "websocket":
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            # A server that cannot answer a handshake with a response: a close before the
            # handshake is refused with a bare 403.
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        prefix = "websocket."  # the same 401, in place of the handshake
    err = errors.Unauthorized(
        "this server requires a token: send Authorization: Bearer <token> "
        "(the CLI reads it from CORTEX_AUTH_TOKEN)"
    )
    body = json.dumps(err.to_dict()).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": f"{prefix}http.response.start", "status": 401, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})
