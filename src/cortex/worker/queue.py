"""The worker's view of the server: the worker HTTP API, with retries.

Standard library only (see `cortex.environments`): a worker runs in the API's own environment,
which holds the user's packages and nothing of the server's. orjson is used where the
environment happens to have it (the server's own interpreter does): it reads a large lease
answer several times faster than `json`. But orjson reads an integer past 64 bits as a float,
and a predictor must get the items as submitted: an answer that may hold one (19 digits in a
row, the rule of `cortex.exactjson`, which the worker cannot import) is read by `json`.

A worker never opens the store. When the server is briefly away (a restart), calls are retried
with backoff for up to `retry_s`; the batches it holds stay leased to it meanwhile, and results
that arrive twice are counted once by the server.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.parse
from typing import Any

from cortex.worker import logship

try:
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    def _loads(data: bytes) -> Any:
        return json.loads(data) if _may_hold_big_int(data) else orjson.loads(data)

except ImportError:  # an API environment without orjson

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def _loads(data: bytes) -> Any:
        return json.loads(data)


_DIGIT_RUN = b"\x01" * 19
_DIGITS = bytes(1 if c in b"0123456789" else 0 for c in range(256))


def _may_hold_big_int(data: bytes) -> bool:
    """19 digits in a row, a chunk at a time (see `cortex.exactjson.may_change`)."""
    step = 1 << 20
    for start in range(0, len(data), step):
        if _DIGIT_RUN in data[start : start + step + len(_DIGIT_RUN) - 1].translate(_DIGITS):
            return True
    return False


log = logging.getLogger("cortex")


class JobGone(Exception):
    """The server no longer knows the job or refuses this worker: stop working."""


class WorkerQueue:
    """The worker API over the standard library's HTTP client.

    A worker makes thousands of small requests and should start fast: `http.client` with one
    keep-alive connection per thread (the loop, the heartbeat, the log shipper) costs a tenth
    of a general-purpose client per request and nothing to import.
    """

    def __init__(
        self, url: str, job_id: str, worker_id: str, token: str, retry_s: float = 120.0
    ) -> None:
        self.worker_id = worker_id
        self.retry_s = retry_s
        parsed = urllib.parse.urlsplit(url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"CORTEX_URL must be an http(s) URL, not {url!r}")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port
        self._prefix = f"{parsed.path}/worker/v1/jobs/{job_id}"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._local = threading.local()
        self.last_response_bytes = 0
        self._connections: list[http.client.HTTPConnection] = []

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = kind(self._host, self._port, timeout=30.0)
            self._local.conn = conn
            self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        for conn in self._connections:
            conn.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        content = None if body is None else _dumps(body)
        while True:
            try:
                conn = self._connection()
                conn.request(method, self._prefix + path, body=content, headers=self._headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as err:
                self._drop_connection()
                problem = f"server unreachable ({err.__class__.__name__}: {err})"
            else:
                if response.status < 300:
                    self.last_response_bytes = len(data)
                    return _loads(data)
                if response.status < 500:
                    raise JobGone(f"{response.status}: {data.decode(errors='replace')}")
                problem = f"server error {response.status}"
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"{problem}; gave up after {self.retry_s:.0f} s")
            log.warning("%s; retrying in %.2f s", problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def spec(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/spec")
        return result

    def set_state(self, state: str, **fields: Any) -> None:
        if state == "failed":  # ends the job: its traceback goes first
            logship.drain()
        self._call("POST", "/state", {"worker_id": self.worker_id, "state": state, **fields})

    def lease(self, results: list[dict[str, Any]], max_batches: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST",
            "/lease",
            {"worker_id": self.worker_id, "results": results, "max_batches": max_batches},
        )
        return result

    def heartbeat(self) -> bool:
        result = self._call("POST", "/heartbeat", {"worker_id": self.worker_id})
        return bool(result.get("ok"))

    def ship_logs(self, lines: list[list[Any]], dropped: int) -> None:
        self._call(
            "POST", "/logs", {"worker_id": self.worker_id, "lines": lines, "dropped": dropped}
        )

    def finish_hook(self, error: str | None, traceback: str | None) -> None:
        logship.drain()  # the hook's lines, then the job's final status
        self._call(
            "POST", "/hook", {"worker_id": self.worker_id, "error": error, "traceback": traceback}
        )
