"""Bad input over real HTTP: every error is a 4xx `{"kind", "message"}`, never a 500."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cortex.client import Client
from cortex.launchers.local import worker_environ
from helpers import Server, deploy_fixture, wait_for


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"kind", "message"}
    assert body["kind"] == kind
    assert body["message"]
    return str(body["message"])


def _body(items: list | None = None, **extra: object) -> dict:
    return {"workers": 1, "item_list": {"items": items or [1], "batch_size": 1}, **extra}


@pytest.fixture
def api_name(client: Client, tmp_path: Path) -> str:
    return deploy_fixture(client, "recorder", tmp_path).name


def test_unknown_api(http: httpx.Client) -> None:
    message = _error(http.post("/nope", json=_body()), 400, "resources.api_not_deployed")
    assert message == "nope is not deployed"
    _error(http.get("/nope"), 400, "resources.api_not_deployed")
    _error(http.get("/nope", params={"jobID": "x"}), 400, "resources.api_not_deployed")
    _error(http.delete("/nope/x"), 400, "resources.api_not_deployed")


def test_unknown_job(http: httpx.Client, api_name: str) -> None:
    message = _error(
        http.get(f"/{api_name}", params={"jobID": "abc"}), 400, "batchapi.job_not_found"
    )
    assert message == f"unable to find batch job abc ({api_name} api)"
    _error(http.get(f"/{api_name}/abc"), 400, "batchapi.job_not_found")
    _error(http.delete(f"/{api_name}", params={"jobID": "abc"}), 400, "batchapi.job_not_found")
    _error(http.delete(f"/{api_name}"), 400, "request.invalid")


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"workers": 1}, "batchapi.specify_exactly_one_key"),
        (
            {
                "workers": 1,
                "item_list": {"items": [1], "batch_size": 1},
                "delimited_files": {"s3_paths": ["s3://b/"], "batch_size": 1},
            },
            "batchapi.conflicting_fields",
        ),
        (
            {"workers": 1, "file_path_lister": {"s3_paths": ["/no-such-root/x"], "batch_size": 1}},
            "batchapi.path_not_allowed",
        ),
        (
            {"workers": 1, "file_path_lister": {"s3_paths": ["s3://b/"], "batch_size": 0}},
            "batchapi.invalid_batch_size",
        ),
        (
            {
                "workers": 1,
                "delimited_files": {"paths": ["s3://b/"], "includes": ["[a"], "batch_size": 1},
            },
            "batchapi.invalid_glob",
        ),
        (
            {"workers": 1, "file_path_lister": {"s3_paths": ["ftp://h/x"], "batch_size": 1}},
            "batchapi.invalid_path",
        ),
        (
            {
                "workers": 1,
                "delimited_files": {"paths": ["s3://b/"], "includes": ["{" * 999], "batch_size": 1},
            },
            "batchapi.invalid_glob",
        ),
        ({"workers": 1, "item_list": {"items": [], "batch_size": 1}}, "batchapi.empty_item_list"),
        (
            {"workers": 1, "item_list": {"items": [1], "batch_size": 0}},
            "batchapi.invalid_batch_size",
        ),
        ({"item_list": {"items": [1], "batch_size": 1}}, "batchapi.invalid_workers"),
        ({"workers": 0, "item_list": {"items": [1], "batch_size": 1}}, "batchapi.invalid_workers"),
        (_body(timeout=0), "batchapi.invalid_timeout"),
        (_body(max_attempts=0), "batchapi.invalid_max_attempts"),
        ({"workers": "two", "item_list": {"items": [1], "batch_size": 1}}, "request.invalid"),
        ({"workers": True, "item_list": {"items": [1], "batch_size": 1}}, "request.invalid"),
        ({"workers": 1, "item_list": {"items": "abc", "batch_size": 1}}, "request.invalid"),
        ({"workers": 1, "item_list": {"batch_size": 1}}, "request.invalid"),
        ({"workers": 1, "item_list": [1, 2]}, "request.invalid"),
        ([1, 2, 3], "request.invalid"),
        ("just a string", "request.invalid"),
    ],
)
def test_bad_submissions(http: httpx.Client, api_name: str, body: object, kind: str) -> None:
    _error(http.post(f"/{api_name}", json=body), 400, kind)
    assert http.get(f"/{api_name}").json()["job_statuses"] == []


@pytest.mark.parametrize(
    ("body", "kind", "says"),
    [
        (
            {"workers": 1, "item_list": {"items": [1], "batch_size": 100_001}},
            "batchapi.invalid_batch_size",
            "item_list.batch_size: must be at most 100000",
        ),
        (
            {"workers": 1, "file_path_lister": {"s3_paths": ["s3://b/"], "batch_size": 2**64}},
            "batchapi.invalid_batch_size",
            "file_path_lister.batch_size: must be at most 100000",
        ),
        (_body(workers=65), "batchapi.too_many_workers", "(64; set CORTEX_MAX_WORKERS"),
        (_body(workers=2**70), "batchapi.too_many_workers", "(64; set CORTEX_MAX_WORKERS"),
        (_body(timeout=2**31), "batchapi.invalid_timeout", "at most 2147483647 seconds"),
        (_body(max_attempts=2**80), "batchapi.invalid_max_attempts", "at most 2147483647"),
    ],
)
def test_integer_fields_are_bounded_and_say_the_bound(
    http: httpx.Client, api_name: str, body: object, kind: str, says: str
) -> None:
    assert says in _error(http.post(f"/{api_name}", json=body), 400, kind)


def test_item_over_the_size_limit_names_the_item(http: httpx.Client, api_name: str) -> None:
    items = ["small", "x" * 262_145, "small"]
    message = _error(
        http.post(f"/{api_name}", json=_body(items, workers=1)),
        400,
        "batchapi.item_size_exceeds_limit",
    )
    assert message.startswith("item 1 has size 262147 bytes")
    assert http.get(f"/{api_name}").json()["job_statuses"] == []


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b'{"workers": 1,'])
def test_malformed_json(http: httpx.Client, api_name: str, content: bytes) -> None:
    response = http.post(
        f"/{api_name}", content=content, headers={"content-type": "application/json"}
    )
    _error(response, 400, "request.invalid")


def test_oversized_bodies_are_refused(http: httpx.Client, api_name: str) -> None:
    big = json.dumps(_body(["x" * 1000] * 11_000)).encode()
    assert len(big) > 10 << 20
    _error(http.post(f"/{api_name}", content=big), 413, "request.body_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    _error(http.post(f"/{api_name}", content=chunked()), 413, "request.body_too_large")
    assert http.get(f"/{api_name}").json()["job_statuses"] == []


def test_dry_run_validates_and_creates_nothing(http: httpx.Client, api_name: str) -> None:
    response = http.post(f"/{api_name}", params={"dryRun": "true"}, json=_body([1, 2, 3]))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "validations passed\n"
    assert http.get(f"/{api_name}").json()["job_statuses"] == []
    _error(
        http.post(f"/{api_name}", params={"dryRun": "true"}, json={"workers": 1}),
        400,
        "batchapi.specify_exactly_one_key",
    )


@pytest.mark.parametrize(
    "path",
    ["/a/b/c/d", "/%2e%2e/%2e%2e/etc/passwd", "/" + "x" * 5000, "/ünïcødé/日本", "/x/y/z"],
)
def test_hostile_paths(http: httpx.Client, path: str) -> None:
    for method in ("GET", "POST", "DELETE"):
        response = http.request(method, path, json=_body())
        assert 400 <= response.status_code < 500, (method, path, response.text)
        assert set(response.json()) == {"kind", "message"}


def test_wrong_method(http: httpx.Client) -> None:
    _error(http.put("/healthz"), 405, "request.method_not_allowed")


def test_deploy_refuses_bad_specs_and_archives(http: httpx.Client) -> None:
    def archive(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def deploy(spec: object, project: bytes) -> httpx.Response:
        return http.post(
            "/deploy",
            data={"spec": json.dumps(spec)},
            files={"project": ("p.tar.gz", project, "application/gzip")},
        )

    good = {"name": "ok-api", "kind": "BatchAPI", "predictor": {"type": "python", "path": "p.py"}}
    code = archive({"p.py": b"class PythonPredictor: pass\n"})
    for reserved in ("healthz", "docs", "metrics", "deploy", "get"):
        message = _error(deploy({**good, "name": reserved}, code), 400, "spec.invalid")
        assert "name" in message and "reserved" in message
    message = _error(deploy({**good, "extra": 1}, code), 400, "spec.invalid")
    assert "extra: unknown key" in message
    message = _error(deploy(good, archive({"other.py": b""})), 400, "spec.invalid")
    assert "predictor.path" in message
    message = _error(deploy(good, archive({"../evil.py": b"", "p.py": b""})), 400, "spec.invalid")
    assert "unsafe path" in message
    _error(deploy(good, b"not a tarball"), 400, "spec.invalid")
    _error(
        http.post("/deploy", data={"spec": "{"}, files={"project": ("p", code)}),
        400,
        "request.invalid",
    )
    _error(http.post("/deploy"), 400, "request.invalid")


def _worker_token(server: Server, job_id: str) -> str:
    """The worker token of a job, as its first worker process was given it."""

    def token() -> str | None:
        for worker in server.worker_processes(job_id):
            return worker_environ(worker)["CORTEX_WORKER_TOKEN"]
        return None

    return wait_for(token, what="a worker of the job")


def test_a_worker_token_kept_in_memory_is_still_checked(
    http: httpx.Client, client: Client, server: Server, api_name: str
) -> None:
    """The server reads a job's worker token once: after that, a wrong token is still
    refused, and so is the right one once the job has been deleted."""
    job_id = client.submit(api_name, _body([{"sleep": 0.2}] * 50))["job_id"]

    right = {"Authorization": f"Bearer {_worker_token(server, job_id)}"}
    path = f"/worker/v1/jobs/{job_id}/spec"
    assert http.get(path, headers=right).json()["job_spec"]["job_id"] == job_id
    assert http.get(path, headers=right).status_code == 200
    _error(http.get(path, headers={"Authorization": "Bearer wrong"}), 403, "auth.forbidden")
    _error(http.get(path), 401, "auth.unauthorized")
    client.delete(api_name)  # stops the job, then deletes it with its API
    _error(http.get(path, headers=right), 403, "auth.forbidden")


def test_a_lease_with_a_bad_body_is_refused_with_what_is_wrong(
    http: httpx.Client, client: Client, server: Server, api_name: str
) -> None:
    """The lease route parses its body itself (in the thread pool): bad bodies still get a
    400 that says what is wrong, and change nothing."""
    job_id = client.submit(api_name, _body([{"sleep": 0.2}] * 8))["job_id"]

    right = {"Authorization": f"Bearer {_worker_token(server, job_id)}"}
    path = f"/worker/v1/jobs/{job_id}/lease"
    worker = f"{job_id}-0"
    bad = [
        (b"{not json", "json"),
        (json.dumps({"max_batches": 1}).encode(), "worker_id"),
        (json.dumps({"worker_id": worker, "max_batches": "many"}).encode(), "max_batches"),
        (json.dumps({"worker_id": worker, "results": [{"ok": True}]}).encode(), "results.0"),
        (json.dumps({"worker_id": worker, "seq": -1}).encode(), "seq"),
    ]
    for content, named in bad:
        message = _error(http.post(path, content=content, headers=right), 400, "request.invalid")
        assert named in message.lower(), message
    # Another job's worker id is refused as before.
    _error(
        http.post(path, json={"worker_id": "other-0", "max_batches": 1}, headers=right),
        403,
        "auth.forbidden",
    )
    assert client.wait(api_name, job_id, timeout=60)["status"] == "status_succeeded"


def test_worker_api_requires_the_jobs_own_token(
    http: httpx.Client, client: Client, api_name: str
) -> None:
    job_id = client.submit(api_name, _body([{"sleep": 0.1}] * 3))["job_id"]
    path = f"/worker/v1/jobs/{job_id}/spec"
    _error(http.get(path), 401, "auth.unauthorized")
    _error(http.get(path, headers={"Authorization": "Bearer wrong"}), 403, "auth.forbidden")
    _error(
        http.get("/worker/v1/jobs/nope/spec", headers={"Authorization": "Bearer wrong"}),
        403,
        "auth.forbidden",
    )
