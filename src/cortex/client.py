"""A Python client for the public REST API; the CLI is a thin shell over it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from cortex import errors, project, spec
from cortex.settings import DEFAULT_URL


def default_url() -> str:
    return os.environ.get("CORTEX_URL", DEFAULT_URL)


class Client:
    def __init__(
        self, url: str | None = None, timeout_s: float = 60.0, token: str | None = None
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        headers = {}
        token = token if token is not None else os.environ.get("CORTEX_AUTH_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise errors.ConnectionFailed(
                f"cannot reach the cortex server at {self.url} ({err.__class__.__name__}); "
                "is `cortex serve` running? (set --url or CORTEX_URL)"
            ) from None
        if response.status_code >= 400:
            self._raise(response)
        return response

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            body = response.json()
            kind, message = body["kind"], body["message"]
        except (ValueError, KeyError, TypeError):
            kind, message = "request.failed", f"{response.status_code}: {response.text}"
        error = errors.CortexError(message, kind=kind)
        error.status_code = response.status_code
        raise error

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def healthz(self) -> bool:
        return bool(self._request("GET", "/healthz").status_code == 200)

    def deploy(self, config_path: Path) -> list[dict[str, Any]]:
        """Validate cortex.yaml, package its folder, and upload each API in it."""
        config_path = Path(config_path)
        if config_path.is_dir():
            config_path = config_path / "cortex.yaml"
        if not config_path.is_file():
            raise errors.InvalidSpec(f"{config_path}: no such file")
        apis = spec.load_config_file(config_path.read_text(), str(config_path))
        root = config_path.parent
        files = {name for name, _ in project.iter_files(root, config_path)}
        for api in apis:
            if api.predictor.path not in files:
                raise errors.InvalidSpec(
                    f"{config_path}: api {api.name!r}: predictor.path: {api.predictor.path} "
                    "is not a file in the project folder (or is excluded by .cortexignore)"
                )
            for path in spec.missing_model_files(api, files):
                raise errors.InvalidSpec(
                    f"{config_path}: api {api.name!r}: predictor: the model {path} is not a file "
                    "or folder in the project (or is excluded by .cortexignore)"
                )
            if api.predictor.python_path and not (root / api.predictor.python_path).is_dir():
                raise errors.InvalidSpec(
                    f"{config_path}: api {api.name!r}: predictor.python_path: "
                    f"{api.predictor.python_path} is not a folder in the project"
                )
        archive = project.build_archive(root, config_path)
        results = []
        for api in apis:
            results.append(
                self._json(
                    "POST",
                    "/deploy",
                    data={"spec": json.dumps(api.to_json())},
                    files={"project": ("project.tar.gz", archive, "application/gzip")},
                )
            )
        return results

    def environment(self, api_name: str, since: int = 0) -> dict[str, Any]:
        """The environment of the API's latest deploy, with its build log from line `since`."""
        result: dict[str, Any] = self._json(
            "GET", f"/get/{api_name}/environment", params={"since": since}
        )
        return result

    def wait_environment(
        self,
        api_name: str,
        on_lines: Callable[[list[str]], None] = lambda _: None,
        poll_s: float = 0.25,
    ) -> dict[str, Any]:
        """Follow the build of the API's latest deploy until it ends, handing its log lines to
        `on_lines` as they come; returns the final environment (state ready, failed or none)."""
        since = 0
        while True:
            env = self.environment(api_name, since)
            if env["lines"]:
                on_lines(env["lines"])
            since = env["next"]
            if env["state"] != "building":
                if env["lines"]:
                    continue  # read the log to its end first
                return env
            time.sleep(poll_s)

    def get_all(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/get")
        return result

    def capacity(self) -> dict[str, Any]:
        """The worker pool (`GET /capacity`)."""
        result: dict[str, Any] = self._json("GET", "/capacity")
        return result

    def get_api(self, api_name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/get/{api_name}")
        return result

    def delete_api(self, api_name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("DELETE", f"/delete/{api_name}")
        return result

    def submit(self, api_name: str, submission: Any, dry_run: bool = False) -> Any:
        """POST a submission: a JSON-able object, or JSON text already encoded (bytes)."""
        params = {"dryRun": "true"} if dry_run else None
        if isinstance(submission, bytes):
            response = self._request(
                "POST",
                f"/{api_name}",
                content=submission,
                headers={"Content-Type": "application/json"},
                params=params,
            )
        else:
            response = self._request("POST", f"/{api_name}", json=submission, params=params)
        if dry_run:
            return response.text
        return response.json()

    def get_job(self, api_name: str, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/{api_name}", params={"jobID": job_id})
        return result

    def list_jobs(self, api_name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", f"/{api_name}")["job_statuses"]
        return result

    def logs(
        self,
        api_name: str,
        job_id: str,
        *,
        follow: bool = False,
        since: str | None = None,
        tail: int | None = None,
        worker: str | None = None,
        batch: str | None = None,
    ) -> Iterator[str]:
        """A job's log lines as text, streamed; with `follow`, until the job has ended."""
        params: dict[str, Any] = {"jobID": job_id, "follow": follow}
        for key, value in (("since", since), ("tail", tail), ("worker", worker), ("batch", batch)):
            if value is not None:
                params[key] = value
        try:
            with self._http.stream(
                "GET", f"/{api_name}/logs", params=params, timeout=httpx.Timeout(30, read=None)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise(response)
                yield from response.iter_lines()
        except httpx.TransportError as err:
            raise errors.ConnectionFailed(
                f"lost the connection to the cortex server at {self.url} ({err.__class__.__name__})"
            ) from None

    def failed_batches(self, api_name: str, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The job's batches that used all their attempts: id, attempts, error, traceback,
        payload."""
        result: list[dict[str, Any]] = self._json(
            "GET", f"/{api_name}/{job_id}/failed_batches", params={"limit": limit}
        )["failed_batches"]
        return result

    def retry_failed(
        self, api_name: str, job_id: str, workers: int | None = None
    ) -> dict[str, Any]:
        """Re-run the failed batches of an ended job as a new job; returns the new job."""
        body = {} if workers is None else {"workers": workers}
        result: dict[str, Any] = self._json("POST", f"/{api_name}/{job_id}/retry_failed", json=body)
        return result

    def wait(
        self,
        api_name: str,
        job_id: str,
        timeout_s: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] = lambda _: None,
        poll_s: float = 0.5,
    ) -> dict[str, Any]:
        """Poll the job until it ends; `on_progress` gets each status seen. Returns the final
        status; TimeoutError after `timeout_s`, the job going on."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status: dict[str, Any] = self.get_job(api_name, job_id)["job_status"]
            on_progress(status)
            if status["status"] not in ("status_enqueuing", "status_running"):
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {status['status']}")
            time.sleep(poll_s)

    def stop_job(self, api_name: str, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("DELETE", f"/{api_name}", params={"jobID": job_id})
        return result
