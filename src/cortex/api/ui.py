"""The web dashboard at `/ui/`: one static page, its script modules and its style, shipped in
the package (`cortex/ui/`). The page holds no data, so it is served without the token; every
data call it makes goes to the public API with the token the person typed in (see
docs/security.md)."""

from __future__ import annotations

import hashlib
import importlib.resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from cortex import errors

router = APIRouter(include_in_schema=False)

_MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "server.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The paths the bearer middleware lets through without a token: exactly these files.
PUBLIC_PATHS = frozenset({"/ui", "/ui/", *(f"/ui/{name}" for name in _MEDIA_TYPES)})

# The page builds every element from text (never HTML), but job logs, errors and payloads are
# written by user code: the policy is a second wall, so that nothing injected can run, load or
# send anywhere but this server (where the token goes). Frames are refused: no clickjacking of
# the stop button.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (a cheap 304): an upgraded server serves its new page at once.
    "Cache-Control": "no-cache",
}


class _Asset:
    def __init__(self, name: str) -> None:
        self.body = (importlib.resources.files("cortex") / "ui" / name).read_bytes()
        self.media_type = _MEDIA_TYPES[name]
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'


def _load() -> dict[str, _Asset]:
    return {name: _Asset(name) for name in _MEDIA_TYPES}


_ASSETS: dict[str, _Asset] | None = None


def _asset(name: str, request: Request) -> Response:
    global _ASSETS
    if _ASSETS is None:  # read once, on first use: nothing is read at import time
        _ASSETS = _load()
    asset = _ASSETS.get(name)
    if asset is None:
        raise errors.NotFound(f"no such file in the dashboard: {name}")
    headers = {**_HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/ui")
async def ui_redirect() -> RedirectResponse:
    # Relative, so that the dashboard also works behind a proxy that serves it under a prefix.
    return RedirectResponse("ui/", status_code=308)


@router.get("/ui/")
async def ui_page(request: Request) -> Response:
    return _asset("index.html", request)


@router.get("/ui/{name}")
async def ui_file(name: str, request: Request) -> Response:
    return _asset(name, request)
