"""The Python client of the public REST API: `from cortex import Client`. The CLI is a thin
shell over it.

Every answer comes back as a typed record of `cortex.schemas` (the same classes the server
declares in its OpenAPI document); every error answer is raised as an exception of the
`cortex.errors` tree that carries the server's `kind`, `message` and `status_code`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import httpx
import pydantic

from cortex import errors, project, schemas, spec
from cortex.settings import DEFAULT_URL

R = TypeVar("R", bound=schemas.Record)


def default_url() -> str:
    return os.environ.get("CORTEX_URL", DEFAULT_URL)


class Client:
    """A connection to one cortex server: `url` defaults to `CORTEX_URL` (else the local
    server), `token` to `CORTEX_AUTH_TOKEN`. Use it as a context manager, or `close()` it."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout_s: float = 60.0
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.token = token if token is not None else os.environ.get("CORTEX_AUTH_TOKEN")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------

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
            kind, message = str(body["kind"]), str(body["message"])
        except (ValueError, KeyError, TypeError):
            kind, message = "request.failed", f"{response.status_code}: {response.text}"
        raise errors.from_answer(response.status_code, kind, message)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _record(self, model: type[R], method: str, path: str, **kwargs: Any) -> R:
        data = self._json(method, path, **kwargs)
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as err:
            raise errors.ServerError(
                f"{method} {path}: the answer is not a {model.__name__}: "
                f"{err.error_count()} problems, the first: {err.errors()[0]['msg']}",
                kind="client.unexpected_answer",
            ) from None

    # -- APIs ------------------------------------------------------------------------------

    def healthz(self) -> bool:
        return bool(self._request("GET", "/healthz").status_code == 200)

    def deploy(self, config_path: str | Path) -> list[schemas.DeployResult]:
        """Validate cortex.yaml (or the one in a folder), package its folder as `cortex
        deploy` does, and deploy each API in it. Answers once the APIs are stored: an API
        whose environment is `building` serves its new version once `wait_environment`
        says it is ready."""
        config_path, apis = _load_project(Path(config_path))
        archive = project.build_archive(config_path.parent, config_path)
        return [
            self._record(
                schemas.DeployResult,
                "POST",
                "/deploy",
                data={"spec": json.dumps(api.to_json())},
                files={"project": ("project.tar.gz", archive, "application/gzip")},
            )
            for api in apis
        ]

    def environment(self, api_name: str, since: int = 0) -> schemas.EnvironmentLog:
        """The environment of the API's latest deploy, with its build log from line `since`."""
        return self._record(
            schemas.EnvironmentLog, "GET", f"/get/{api_name}/environment", params={"since": since}
        )

    def wait_environment(
        self,
        api_name: str,
        on_lines: Callable[[list[str]], None] = lambda _: None,
        poll_s: float = 0.25,
    ) -> schemas.EnvironmentLog:
        """Follow the build of the API's latest deploy until it ends, handing its log lines to
        `on_lines` as they come; returns the final environment (state ready, failed or none)."""
        since = 0
        while True:
            env = self.environment(api_name, since)
            if env.lines:
                on_lines(env.lines)
            since = env.next
            if env.state != "building":
                if env.lines:
                    continue  # read the log to its end first
                return env
            time.sleep(poll_s)

    def get_all(self) -> schemas.ApiList:
        """Every deployed API, each with its newest job."""
        return self._record(schemas.ApiList, "GET", "/get")

    def capacity(self) -> schemas.Capacity:
        """The worker pool (`GET /capacity`): its capacity, in use and free, each job's share."""
        return self._record(schemas.Capacity, "GET", "/capacity")

    def get_api(self, api_name: str) -> schemas.ApiDetails:
        """One API with its in-progress jobs, topped up with the newest others to 10."""
        return self._record(schemas.ApiDetails, "GET", f"/get/{api_name}")

    def delete(self, api_name: str) -> schemas.Message:
        """Delete an API: its running jobs are stopped, its job history erased."""
        return self._record(schemas.Message, "DELETE", f"/delete/{api_name}")

    delete_api = delete

    # -- jobs ------------------------------------------------------------------------------

    @overload
    def submit(
        self,
        api_name: str,
        submission: Any,
        dry_run: Literal[False] = False,
        idempotency_key: str | None = None,
    ) -> schemas.JobSpec: ...

    @overload
    def submit(
        self,
        api_name: str,
        submission: Any,
        dry_run: Literal[True],
        idempotency_key: str | None = None,
    ) -> str: ...

    @overload
    def submit(
        self,
        api_name: str,
        submission: Any,
        dry_run: bool,
        idempotency_key: str | None = None,
    ) -> schemas.JobSpec | str: ...

    def submit(
        self,
        api_name: str,
        submission: Any,
        dry_run: bool = False,
        idempotency_key: str | None = None,
    ) -> Any:
        """Submit a job: `submission` is the JSON of `POST /<api>` (spec §4.1) as an object,
        or as JSON text already encoded (bytes). Returns the job; with `dry_run`, the text
        the server answers (the matched files, then `validations passed`). With an
        `idempotency_key`, a submission sent again (after a timeout, say) answers the job the
        first one created instead of creating another."""
        params = {"dryRun": "true"} if dry_run else None
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        if isinstance(submission, bytes):
            kwargs: dict[str, Any] = {
                "content": submission,
                "headers": {**headers, "Content-Type": "application/json"},
            }
        else:
            kwargs = {"json": submission, "headers": headers}
        if dry_run:
            return self._request("POST", f"/{api_name}", params=params, **kwargs).text
        return self._record(schemas.JobSpec, "POST", f"/{api_name}", **kwargs)

    def get_job(self, api_name: str, job_id: str) -> schemas.JobDetails:
        """A job's status (`.job_status`), the API version it runs and its endpoint."""
        return self._record(schemas.JobDetails, "GET", f"/{api_name}", params={"jobID": job_id})

    def list_jobs(
        self, api_name: str, metadata: dict[str, str] | None = None, limit: int = 100
    ) -> list[schemas.JobStatus]:
        """The API's jobs, newest first; with `metadata`, only those whose metadata holds all
        of it."""
        params: dict[str, Any] = {"limit": limit}
        params.update({f"metadata.{key}": value for key, value in (metadata or {}).items()})
        listing = self._record(schemas.JobList, "GET", f"/{api_name}", params=params)
        return listing.job_statuses

    def wait(
        self,
        api_name: str,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: Callable[[schemas.JobStatus], None] | None = None,
    ) -> schemas.JobStatus:
        """Poll the job every `poll_s` seconds until it ends; `on_progress` gets each status
        seen. Returns the final status, whatever it is. After `timeout` seconds raises
        `errors.WaitTimeout` (a TimeoutError): the job goes on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.get_job(api_name, job_id).job_status
            if on_progress is not None:
                on_progress(status)
            if not status.in_progress:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.WaitTimeout(f"job {job_id} is still {status.status} after {timeout} s")
            time.sleep(poll_s)

    def stop_job(self, api_name: str, job_id: str) -> schemas.Message:
        """Stop an in-progress job (`errors.Conflict` if it has ended)."""
        return self._record(schemas.Message, "DELETE", f"/{api_name}", params={"jobID": job_id})

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
        """A job's log lines as text, streamed; with `follow`, until the job has ended and
        every line is out. `since` (30s, 5m, 2h, 1d or a time), `tail` (the last N lines),
        `worker` (0, worker-0 or server) and `batch` (a batch id) narrow it."""
        params: dict[str, Any] = {"jobID": job_id, "follow": follow}
        for key, value in (("since", since), ("tail", tail), ("worker", worker), ("batch", batch)):
            if value is not None:
                params[key] = value
        for response in self._stream(f"/{api_name}/logs", params):
            yield from response.iter_lines()

    def results(self, api_name: str, job_id: str) -> Iterator[bytes]:
        """A job's collected results, as JSON lines (`{"batch_id", "index", "result"}`),
        streamed in chunks of bytes."""
        for response in self._stream(f"/{api_name}/{job_id}/results", {}):
            yield from response.iter_bytes()

    def _stream(self, path: str, params: dict[str, Any]) -> Iterator[httpx.Response]:
        """A streamed GET: its response (once), an error answer raised, a lost connection
        said as one."""
        try:
            with self._http.stream(
                "GET", path, params=params, timeout=httpx.Timeout(30, read=None)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise(response)
                yield response
        except httpx.TransportError as err:
            raise errors.ConnectionFailed(
                f"lost the connection to the cortex server at {self.url} ({err.__class__.__name__})"
            ) from None

    def failed_batches(
        self, api_name: str, job_id: str, limit: int = 100
    ) -> list[schemas.FailedBatch]:
        """The job's batches that used all their attempts: attempts, error, traceback,
        payload."""
        return self._record(
            schemas.FailedBatches,
            "GET",
            f"/{api_name}/{job_id}/failed_batches",
            params={"limit": limit},
        ).failed_batches

    def retry_failed(
        self, api_name: str, job_id: str, workers: int | None = None
    ) -> schemas.JobSpec:
        """Re-run the failed batches of an ended job as a new job; returns the new job."""
        body = {} if workers is None else {"workers": workers}
        return self._record(
            schemas.JobSpec, "POST", f"/{api_name}/{job_id}/retry_failed", json=body
        )

    def workers(self, api_name: str, job_id: str) -> list[schemas.Worker]:
        """The job's workers, replacements included, oldest first."""
        return self._record(schemas.JobWorkers, "GET", f"/{api_name}/{job_id}/workers").workers


def _load_project(config_path: Path) -> tuple[Path, list[spec.APISpec]]:
    """cortex.yaml's APIs, checked against the files its folder ships; each refusal names the
    file and the field."""
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
    return config_path, apis
