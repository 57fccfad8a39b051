"""The worker's view of the server: the worker HTTP API, with retries.

A worker never opens the store. When the server is briefly away (a restart), calls are retried
with backoff for up to `retry_s`; the batches it holds stay leased to it meanwhile, and results
that arrive twice are counted once by the server.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import orjson

log = logging.getLogger("cortex")


class JobGone(Exception):
    """The server no longer knows the job or refuses this worker: stop working."""


class WorkerQueue:
    def __init__(
        self, url: str, job_id: str, worker_id: str, token: str, retry_s: float = 120.0
    ) -> None:
        self.worker_id = worker_id
        self.retry_s = retry_s
        self._client = httpx.Client(
            base_url=f"{url.rstrip('/')}/worker/v1/jobs/{job_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, connect=5.0),
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        content = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else None
        while True:
            try:
                response = self._client.request(method, path, content=content, headers=headers)
            except httpx.TransportError as err:
                problem = f"server unreachable ({err.__class__.__name__})"
            else:
                if response.status_code < 300:
                    return orjson.loads(response.content)
                if response.status_code < 500:
                    raise JobGone(f"{response.status_code}: {response.text}")
                problem = f"server error {response.status_code}"
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"{problem}; gave up after {self.retry_s:.0f} s")
            log.warning("%s; retrying in %.2f s", problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def spec(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/spec")
        return result

    def set_state(self, state: str, **fields: Any) -> None:
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
        self._call(
            "POST", "/hook", {"worker_id": self.worker_id, "error": error, "traceback": traceback}
        )
