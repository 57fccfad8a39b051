"""The worker's view of the server: one interface, `WorkerQueue`, and its HTTP adapter.

`WorkerQueue` writes the protocol once (as saq's `queue/base.py` does): what each request
carries, its sequence number, and retrying a request until it is answered. An adapter only
sends one request and says how it went (`_send`): `HttpQueue` here, over the worker HTTP API,
and `cortex.store.workerqueue.StoreQueue`, straight on the store, which runs the same worker
loop in the tests. (Both adapters would be modules of their own, as saq's are; the HTTP one
lives here because the worker runtime is the fixed list of modules `cortex.environments`
copies into API environments.)

Standard library only (see `cortex.environments`): a worker runs in the API's own environment,
which holds the user's packages and nothing of the server's. orjson is used where the
environment happens to have it (the server's own interpreter does): it reads a large lease
answer several times faster than `json`. But orjson reads an integer past 64 bits as a float,
and a predictor must get the items as submitted: an answer that may hold one (19 digits in a
row, the rule of `cortex.exactjson`, which the worker cannot import) is read by `json`.

**Sequence numbers.** A request can reach the server and its answer be lost (a proxy closes the
connection, the server dies after committing). The worker then sends it again, with the same
number, and the server answers a number it has already acted on with the answer it kept (see
`cortex.store.protocol`), so nothing happens twice and nothing is lost: no batch leased twice
or left stranded, no result counted twice, no hook claim lost, no log lines stored twice. The
worker loop's requests (state, lease, hook) are one numbered channel, log shipments another;
heartbeats and reading the spec need no number (doing them twice does no harm). Numbers start
at the time the process started, in microseconds, so a worker restarted under the same id
still counts upwards.

**Answers.** The server is away (unreachable, 5xx, a proxy's 502): retried with backoff for up
to `retry_s`, then `Unreachable`. 401, 403 or "job not found": `JobGone`, the job is over for
this worker (deleted, or the token refused) and it stops, exit 0. Any other refusal (a 4xx):
`Refused`, a failure, which the worker reports and exits on with a non-zero code; it is never
taken for a clean finish.
"""

from __future__ import annotations

import http.client
import itertools
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

# The numbered channels: one thread sends on each, one request at a time.
LOOP = "loop"
LOGS = "logs"
# The kind of the answer that says the job no longer exists.
JOB_NOT_FOUND = "batchapi.job_not_found"


class JobGone(Exception):
    """The server no longer knows the job, or refuses this worker's token: stop working."""


class Refused(Exception):
    """The server refused a request (a 4xx that does not mean the job is gone): a failure."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind


class Unavailable(Exception):
    """Raised by an adapter: this attempt failed in a way that a later one may not."""


class Unreachable(ConnectionError):
    """The server stayed unavailable for `retry_s`."""


class WorkerQueue:
    """The worker's requests to the server, each retried until answered. An adapter implements
    `_send`; everything else is here."""

    def __init__(self, worker_id: str, retry_s: float = 120.0) -> None:
        self.worker_id = worker_id
        self.retry_s = retry_s
        # Bytes of the last answer, where the adapter knows them (the loop sizes its leases).
        self.last_response_bytes = 0
        # Set once a heartbeat's answer asks this worker to drain: finish the batch it runs,
        # report, and exit (the server answers its next lease with `done`).
        self.draining = threading.Event()
        first = time.time_ns() // 1000
        self._numbers = {LOOP: itertools.count(first), LOGS: itertools.count(first)}

    # -- the protocol -----------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("spec", None)
        return result

    def set_state(self, state: str, **fields: Any) -> None:
        if state == "failed":  # ends the job: its traceback goes first
            logship.drain()
        self._request("state", {"worker_id": self.worker_id, "state": state, **fields}, LOOP)

    def lease(
        self,
        results: list[dict[str, Any]],
        max_batches: int,
        hold: bool = False,
        leaving: bool = False,
    ) -> dict[str, Any]:
        """Report `results` and lease up to `max_batches` more: `{batches: [{batch_id,
        attempt, payload}], run_hook, done, job_summary}`. With `hold` (and `max_batches`
        0), only report: the batches this worker still holds stay its own. With `leaving`,
        this is the worker's last report: the batches it did not start go back."""
        body: dict[str, Any] = {
            "worker_id": self.worker_id,
            "results": results,
            "max_batches": max_batches,
        }
        if hold:
            body["hold"] = True
        if leaving:
            body["leaving"] = True
        result: dict[str, Any] = self._request("lease", body, LOOP)
        return result

    def payload(self, batch_id: str) -> dict[str, Any]:
        """A batch's payload as the server reads it (for a batch stored by reference whose
        files this process cannot read): `{payload}`, or `{error}` if it cannot be given."""
        result: dict[str, Any] = self._request(
            "payload", {"worker_id": self.worker_id, "batch_id": batch_id}
        )
        return result

    def heartbeat(self) -> bool:
        result = self._request("heartbeat", {"worker_id": self.worker_id})
        if result.get("drain"):
            self.draining.set()
        return bool(result.get("ok"))

    def ship_logs(self, lines: list[list[Any]], dropped: int) -> None:
        body = {"worker_id": self.worker_id, "lines": lines, "dropped": dropped}
        self._request("logs", body, LOGS)

    def finish_hook(self, error: str | None, traceback: str | None) -> None:
        logship.drain()  # the hook's lines, then the job's final status
        body = {"worker_id": self.worker_id, "error": error, "traceback": traceback}
        self._request("hook", body, LOOP)

    def close(self) -> None:
        """Let go of connections."""

    # -- sending ----------------------------------------------------------------------------

    def _request(self, op: str, body: dict[str, Any] | None, channel: str | None = None) -> Any:
        """Send until answered: the same body, with the same number, every time."""
        if channel is not None:
            assert body is not None
            body = {**body, "seq": next(self._numbers[channel])}
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                return self._send(op, body)
            except Unavailable as err:
                problem = str(err)
            if time.monotonic() + delay > deadline:
                raise Unreachable(f"{problem}; gave up after {self.retry_s:.0f} s")
            log.warning("%s; retrying in %.2f s", problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _send(self, op: str, body: dict[str, Any] | None) -> Any:
        """One attempt at request `op` ("spec", "state", "lease", "payload", "heartbeat", "logs",
        "hook"):
        its answer, or `Unavailable`, `JobGone` or `Refused`."""
        raise NotImplementedError


# The HTTP method and path of each request, under /worker/v1/jobs/<job id>.
_ROUTES = {
    "spec": ("GET", "/spec"),
    "state": ("POST", "/state"),
    "lease": ("POST", "/lease"),
    "heartbeat": ("POST", "/heartbeat"),
    "payload": ("POST", "/payload"),
    "logs": ("POST", "/logs"),
    "hook": ("POST", "/hook"),
}
# Answers a proxy or a busy server gives that a later attempt may not get.
_TRANSIENT = frozenset({408, 429})


class HttpQueue(WorkerQueue):
    """The worker API over the standard library's HTTP client.

    A worker makes thousands of small requests and should start fast: `http.client` with one
    keep-alive connection per thread (the loop, the heartbeat, the log shipper) costs a tenth
    of a general-purpose client per request and nothing to import.
    """

    def __init__(
        self, url: str, job_id: str, worker_id: str, token: str, retry_s: float = 120.0
    ) -> None:
        super().__init__(worker_id, retry_s)
        parsed = urllib.parse.urlsplit(url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"CORTEX_URL must be an http(s) URL, not {url!r}")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port
        self._prefix = f"{parsed.path}/worker/v1/jobs/{job_id}"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._local = threading.local()
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

    def _send(self, op: str, body: dict[str, Any] | None) -> Any:
        method, path = _ROUTES[op]
        content = None if body is None else _dumps(body)
        try:
            conn = self._connection()
            conn.request(method, self._prefix + path, body=content, headers=self._headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as err:
            self._drop_connection()
            raise Unavailable(f"server unreachable ({err.__class__.__name__}: {err})") from None
        status = response.status
        if status < 300:
            self.last_response_bytes = len(data)
            return _loads(data)
        if status >= 500 or status in _TRANSIENT:
            raise Unavailable(f"server error {status}")
        kind, message = _error(data)
        if status in (401, 403) or (status == 404 and kind == JOB_NOT_FOUND):
            raise JobGone(f"{status} {kind}: {message}")
        raise Refused(status, kind, message)


def _error(data: bytes) -> tuple[str, str]:
    """The kind and message of an error answer (`{"kind", "message"}`), or what it says."""
    try:
        body = _loads(data)
        return str(body["kind"]), str(body["message"])
    except Exception:  # not ours: a proxy's page
        return "unknown", data[:200].decode(errors="replace")
